//! The machine a measurement ran on, and when: every report names its CPU, cores, memory and load.

/// The CPU from /proc/cpuinfo: its model name, then its family and model numbers and the widest vector
/// instructions the kernels can use — a virtual machine may call very different CPUs just "AMD EPYC" (a Zen 3
/// without AVX-512 and a Zen 4 with it have been seen under that one name, decoding at different speeds).
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| describe_cpu(&s))
}

/// [`cpu_model`] from the text of /proc/cpuinfo (its first processor).
pub fn describe_cpu(cpuinfo: &str) -> Option<String> {
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .map(|l| l.split_once(':').map_or("", |(_, v)| v).trim().to_string())
    };
    let name = field("model name")?;
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let isa = if has("avx512f") {
        if has("avx512_vnni") {
            "AVX-512 VNNI"
        } else {
            "AVX-512"
        }
    } else if has("avx2") {
        "AVX2"
    } else {
        "no AVX2"
    };
    // AMX as the CPU advertises it (whether Linux grants it to a process is `engine::amx::available`).
    let amx = if has("amx_tile") && has("amx_int8") { ", AMX" } else { "" };
    let isa = format!("{isa}{amx}");
    Some(match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f} model {m}; {isa})"),
        _ => format!("{name} ({isa})"),
    })
}

pub fn machine() -> String {
    let cpu = cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0)))
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {:.0} GB RAM", mem as f64 / 1048576.0)
}

pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_is_named_with_its_family_model_and_vector_width() {
        let zen3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                    model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n";
        assert_eq!(describe_cpu(zen3).as_deref(), Some("AMD EPYC (family 25 model 1; AVX2)"));
        let zen4 = zen3.replace("model\t\t: 1", "model\t\t: 17").replace("fma", "fma avx512f avx512_vnni");
        assert_eq!(describe_cpu(&zen4).as_deref(), Some("AMD EPYC (family 25 model 17; AVX-512 VNNI)"));
        let spr = "cpu family : 6\nmodel : 207\nmodel name : Intel(R) Xeon(R) Processor\n\
                   flags : avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n";
        let named = "Intel(R) Xeon(R) Processor (family 6 model 207; AVX-512 VNNI, AMX)";
        assert_eq!(describe_cpu(spr).as_deref(), Some(named));
        let plain = "model name : Some CPU\nflags : sse2 avx512f\n";
        assert_eq!(describe_cpu(plain).as_deref(), Some("Some CPU (AVX-512)"));
        assert_eq!(describe_cpu("flags : avx2\n"), None, "no model name, no description");
    }

    #[test]
    fn utc_format() {
        let s = utc_now();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }
}
