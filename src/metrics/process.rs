//! The `process_*` metrics, read from `/proc/self` at each scrape (Linux), and the process
//! start time that `fairway_process_start_time_seconds` repeats.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// When the process started, as Unix seconds: read once from `/proc` (the time of the first
/// call where `/proc` cannot be read), so every app of the process reports the same value.
pub fn start_time() -> f64 {
    static START: OnceLock<f64> = OnceLock::new();
    *START.get_or_init(|| {
        process_start_time().unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        })
    })
}

/// `process_*` metrics read from `/proc/self` at each scrape.
#[derive(Debug)]
pub struct ProcessCollector {
    start_time: f64,
    ticks_per_second: f64,
    page_size: f64,
}

impl ProcessCollector {
    /// A collector reporting `start_time` as `process_start_time_seconds`.
    pub fn new(start_time: f64) -> ProcessCollector {
        ProcessCollector {
            start_time,
            // Linux's USER_HZ and page size are 100 and 4096 on every platform fairway
            // targets; reading them would need libc.
            ticks_per_second: 100.0,
            page_size: 4096.0,
        }
    }
}

/// Fields of `/proc/self/stat` after the command name: (utime+stime ticks, start ticks, rss
/// pages, vsize bytes).
fn read_stat() -> Option<(f64, f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22,
    // vsize 23, rss 24.
    let get = |n: usize| f.get(n - 3)?.parse::<f64>().ok();
    Some((get(14)? + get(15)?, get(22)?, get(24)?, get(23)?))
}

fn process_start_time() -> Option<f64> {
    let (_, start_ticks, _, _) = read_stat()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let up: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some(now - up + start_ticks / 100.0)
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = |enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        if let Some((ticks, _, rss_pages, vsize)) = read_stat() {
            let c = ConstCounter::new(ticks / self.ticks_per_second);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss_pages * self.page_size,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize,
            )?;
        }
        if let Some(n) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                n,
            )?;
        }
        if let Some(n) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                n,
            )?;
        }
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            self.start_time,
        )
    }
}
