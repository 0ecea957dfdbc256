//! What a process holds, read from `/proc`: resident memory, open descriptors and their
//! limit; and [`HEAVY`], which keeps the tests that move a lot of either from overlapping.

pub const MIB: u64 = 1024 * 1024;

/// Tests that move a lot of memory or file descriptors take this lock, so that they run one
/// at a time within their test binary: RSS figures are then the test's own and the fd limit
/// is not shared. (Cargo runs test binaries one after another, so tests in different files
/// never overlap.)
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident set size of this process in bytes (tests run the proxy in-process).
pub fn rss_bytes() -> u64 {
    rss_bytes_of("self")
}

/// Resident set size of process `pid` ("self" for this one) in bytes; 0 if unreadable.
pub fn rss_bytes_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    open_fds_of("self")
}

/// Open descriptors of process `pid` ("self" for this one); 0 if unreadable.
pub fn open_fds_of(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// What the descriptors of process `pid` point at.
pub fn fd_targets(pid: &str) -> Vec<String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"));
    dir.map(|d| {
        d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    })
    .unwrap_or_default()
}

/// The soft limit on open files of this process.
pub fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}
