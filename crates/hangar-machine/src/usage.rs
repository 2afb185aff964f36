//! What a running machine uses, read from the host: a container's from its
//! cgroup (v1 or v2, `hangar/<id>`), a micro-VM's from its QEMU process;
//! network bytes from the machine's host-side device (the veth, or the
//! tap), counted as the machine sees them.

use std::path::Path;

/// A machine's resource use since it started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// The memory it may have (none: no limit found).
    pub memory_limit_bytes: Option<u64>,
    pub received_bytes: u64,
    pub transmitted_bytes: u64,
    /// OOM kills in its cgroup (always 0 for a micro-VM: the guest's
    /// kernel handles its own).
    pub oom_kills: u64,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.events, memory.oom_control).
fn field(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Bytes through the host-side device `dev`: what it receives the
/// machine sent.
fn network(dev: &str) -> (u64, u64) {
    let stat = |name: &str| {
        read_u64(
            &Path::new("/sys/class/net")
                .join(dev)
                .join("statistics")
                .join(name),
        )
        .unwrap_or(0)
    };
    (stat("tx_bytes"), stat("rx_bytes"))
}

/// A container's use, from its cgroup under `root` (`/sys/fs/cgroup`)
/// and its host veth `dev`; `None` when it has no cgroup (not running).
pub fn container(root: &Path, id: &str, dev: &str) -> Option<Usage> {
    let v2 = root.join("hangar").join(id);
    let (received_bytes, transmitted_bytes) = network(dev);
    if v2.join("cgroup.controllers").exists() {
        let max = std::fs::read_to_string(v2.join("memory.max")).ok();
        return Some(Usage {
            cpu_seconds: field(&v2.join("cpu.stat"), "usage_usec")? as f64 / 1e6,
            memory_bytes: read_u64(&v2.join("memory.current")).unwrap_or(0),
            memory_limit_bytes: max.and_then(|m| m.trim().parse().ok()),
            received_bytes,
            transmitted_bytes,
            oom_kills: field(&v2.join("memory.events"), "oom_kill").unwrap_or(0),
        });
    }
    let memory = root.join("memory").join("hangar").join(id);
    let cpu = ["cpuacct", "cpu,cpuacct", "cpu"]
        .iter()
        .find_map(|c| read_u64(&root.join(c).join("hangar").join(id).join("cpuacct.usage")))?;
    // v1 says "no limit" with a huge number.
    let limit = read_u64(&memory.join("memory.limit_in_bytes")).filter(|l| *l < 1 << 62);
    Some(Usage {
        cpu_seconds: cpu as f64 / 1e9,
        memory_bytes: read_u64(&memory.join("memory.usage_in_bytes")).unwrap_or(0),
        memory_limit_bytes: limit,
        received_bytes,
        transmitted_bytes,
        oom_kills: field(&memory.join("memory.oom_control"), "oom_kill").unwrap_or(0),
    })
}

/// A micro-VM's use: its QEMU process `pid` (CPU time and resident
/// memory, the guest's RAM included), the guest's `memory_mb`, and its
/// tap `dev`.
pub fn vm(pid: u32, memory_mb: u64, dev: &str) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0);
    let (received_bytes, transmitted_bytes) = network(dev);
    Some(Usage {
        // The kernel's clock ticks (USER_HZ) are 100 per second on Linux.
        cpu_seconds: ticks as f64 / 100.0,
        memory_bytes: rss_kib * 1024,
        memory_limit_bytes: Some(memory_mb << 20),
        received_bytes,
        transmitted_bytes,
        oom_kills: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_cgroup_and_a_v1_cgroup_read_the_same_way() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("hangar/m1");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 2500000\nuser_usec 1\n").unwrap();
        std::fs::write(v2.join("memory.current"), "1048576\n").unwrap();
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        std::fs::write(v2.join("memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
        let u = container(root.path(), "m1", "none").unwrap();
        assert_eq!(
            (
                u.cpu_seconds,
                u.memory_bytes,
                u.memory_limit_bytes,
                u.oom_kills
            ),
            (2.5, 1 << 20, None, 1)
        );

        let root = tempfile::tempdir().unwrap();
        for (c, file, text) in [
            ("cpuacct", "cpuacct.usage", "3000000000\n"),
            ("memory", "memory.usage_in_bytes", "4096\n"),
            ("memory", "memory.limit_in_bytes", "268435456\n"),
            (
                "memory",
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
        ] {
            let d = root.path().join(c).join("hangar/m1");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(file), text).unwrap();
        }
        let u = container(root.path(), "m1", "none").unwrap();
        assert_eq!(
            (
                u.cpu_seconds,
                u.memory_bytes,
                u.memory_limit_bytes,
                u.oom_kills
            ),
            (3.0, 4096, Some(256 << 20), 2)
        );
        assert_eq!(container(root.path(), "gone", "none"), None);
    }

    #[test]
    fn a_process_reads_as_a_vm() {
        let u = vm(std::process::id(), 128, "none").unwrap();
        assert!(u.memory_bytes > 0);
        assert_eq!(u.memory_limit_bytes, Some(128 << 20));
    }
}
