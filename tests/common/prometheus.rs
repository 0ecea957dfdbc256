//! A parser of the Prometheus text exposition format 0.0.4, strict about what the format
//! requires, and the lookups tests make on a parsed scrape (one sample, a sum over label
//! sets, a histogram series).

use std::collections::{BTreeMap, BTreeSet};

/// The kind a `# TYPE` line declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            "untyped" => Kind::Untyped,
            _ => return None,
        })
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// The family the sample belongs to (`x` for `x_bucket` of histogram `x`).
    pub family: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    pub kinds: BTreeMap<String, Kind>,
    pub samples: Vec<Sample>,
    /// Comment lines other than `# HELP` and `# TYPE`.
    pub comments: Vec<String>,
}

/// A histogram series: `(le, cumulative count)` in exposition order, `_sum`, `_count`.
#[derive(Debug)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
pub fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// `name{l="v",...} value [timestamp]` → (name, labels, value).
fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let mut it = line.char_indices().peekable();
    let name_end = loop {
        match it.peek() {
            Some(&(i, c)) if (i == 0 && is_name_start(c)) || (i > 0 && is_name_char(c)) => {
                it.next();
            }
            Some(&(i, _)) => break i,
            None => break line.len(),
        }
    };
    if name_end == 0 {
        return Err("no metric name".into());
    }
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    if let Some(&(_, '{')) = it.peek() {
        it.next();
        loop {
            while matches!(it.peek(), Some(&(_, ' '))) {
                it.next();
            }
            match it.peek() {
                Some(&(_, '}')) => {
                    it.next();
                    break;
                }
                None => return Err("unclosed label set".into()),
                _ => {}
            }
            let mut key = String::new();
            while let Some(&(_, c)) = it.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    key.push(c);
                    it.next();
                } else {
                    break;
                }
            }
            if key.is_empty() || key.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!("bad label name {key:?}"));
            }
            if it.next().map(|x| x.1) != Some('=') {
                return Err(format!("expected '=' after label {key:?}"));
            }
            if it.next().map(|x| x.1) != Some('"') {
                return Err(format!("expected '\"' to open the value of {key:?}"));
            }
            let mut value = String::new();
            loop {
                match it.next().map(|x| x.1) {
                    Some('"') => break,
                    Some('\\') => match it.next().map(|x| x.1) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => {
                            return Err(format!("bad escape \\{other:?} in label {key:?}"));
                        }
                    },
                    Some('\n') => return Err("raw newline in a label value".into()),
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated value of label {key:?}")),
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key:?} given twice"));
            }
            while matches!(it.peek(), Some(&(_, ' '))) {
                it.next();
            }
            match it.next().map(|x| x.1) {
                Some(',') => {}
                Some('}') => break,
                other => return Err(format!("expected ',' or '}}', found {other:?}")),
            }
        }
    }
    let rest: String = it.map(|x| x.1).collect();
    if !rest.starts_with([' ', '\t']) {
        return Err(format!(
            "no blank between the series and the value: {rest:?}"
        ));
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|e| format!("bad timestamp {ts:?}: {e}"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!("trailing text {extra:?}"));
    }
    Ok((name, labels, value))
}

impl Exposition {
    /// The family a sample name belongs to, given the `# TYPE` lines seen so far.
    fn family_of(&self, name: &str) -> String {
        if self.kinds.contains_key(name) {
            return name.to_owned();
        }
        for (suffix, kinds) in [
            ("_bucket", &[Kind::Histogram][..]),
            ("_sum", &[Kind::Histogram, Kind::Summary][..]),
            ("_count", &[Kind::Histogram, Kind::Summary][..]),
        ] {
            if let Some(stem) = name.strip_suffix(suffix)
                && self.kinds.get(stem).is_some_and(|k| kinds.contains(k))
            {
                return stem.to_owned();
            }
        }
        name.to_owned()
    }

    /// The declared kind of `family`.
    pub fn kind(&self, family: &str) -> Option<Kind> {
        self.kinds.get(family).copied()
    }

    /// The value of sample `name` whose label set is exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// The value of sample `name` whose label set is exactly `labels`; panics, listing the
    /// label sets exposed under `name`, if there is none.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let have: Vec<_> = self.series(name).map(|s| &s.labels).collect();
            panic!("{name}{labels:?} not exposed; {name} has {have:?}")
        })
    }

    /// The sum of the samples named `name` whose labels include every pair of `labels`;
    /// 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Every sample named `name`.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The histogram series of `family` whose labels other than `le` are `labels`.
    pub fn histogram(&self, family: &str, labels: &[(&str, &str)]) -> Option<Histogram> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let bucket_name = format!("{family}_bucket");
        let mut buckets = Vec::new();
        for s in self.series(&bucket_name) {
            let mut rest = s.labels.clone();
            let le = rest.remove("le")?;
            if rest == want {
                buckets.push((parse_value(&le).ok()?, s.value));
            }
        }
        Some(Histogram {
            buckets,
            sum: self.get(&format!("{family}_sum"), labels)?,
            count: self.get(&format!("{family}_count"), labels)?,
        })
    }
}

/// Parses a scrape, checking what the format requires: valid names and label syntax,
/// at most one `# TYPE` per family and before its samples, each family's samples in one
/// group, no series twice, `le` on every histogram bucket.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut current: Option<String> = None;
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().unwrap_or_default();
                    let kind = words.next().unwrap_or_default().trim();
                    if !is_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    let kind =
                        Kind::parse(kind).ok_or_else(|| at(format!("unknown type {kind:?}")))?;
                    if e.kinds.insert(name.to_owned(), kind).is_some() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                    if finished.contains(name) || current.as_deref() == Some(name) {
                        return Err(at(format!("TYPE for {name} after its samples")));
                    }
                }
                Some("HELP") => {
                    let name = words.next().unwrap_or_default();
                    if !is_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                }
                _ => e.comments.push(line.to_owned()),
            }
            continue;
        }
        let (name, labels, value) = parse_sample(line).map_err(at)?;
        let family = e.family_of(&name);
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at(format!("samples of {family} are not grouped together")));
            }
            if let Some(prev) = current.replace(family.clone()) {
                finished.insert(prev);
            }
        }
        if e.kind(&family) == Some(Kind::Histogram)
            && name.ends_with("_bucket")
            && !labels.contains_key("le")
        {
            return Err(at("histogram bucket without le".into()));
        }
        let key = (
            name.clone(),
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        );
        if !seen.insert(key) {
            return Err(at("the same series twice".into()));
        }
        e.samples.push(Sample {
            name,
            family,
            labels,
            value,
        });
    }
    Ok(e)
}
