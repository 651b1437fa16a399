//! Small shared helpers: canonical JSON (the byte form every digest is taken over) and UTC timestamps.

use serde::Serialize;

/// Canonical JSON of a value: object keys sorted (serde_json's default map is a BTreeMap), no
/// whitespace, shortest round-trip floats. Two equal values always give the same bytes.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Going through Value sorts the keys of structs as well as of maps.
    let v = serde_json::to_value(value).expect("values used in keys serialise to JSON");
    serde_json::to_vec(&v).expect("a JSON value serialises")
}

/// Seconds since the Unix epoch, as a float.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-23T20:32:18.123Z`.
pub fn rfc3339(unix: f64) -> String {
    let secs = unix.floor() as i64;
    let millis = ((unix - secs as f64) * 1000.0).floor() as u32;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Compact sortable timestamp for identifiers, e.g. `20261123T203218`.
pub fn compact_timestamp(unix: f64) -> String {
    let s = rfc3339(unix);
    s[..19].replace(['-', ':'], "")
}

/// Keep freed tensor memory in the heap for reuse. With glibc's defaults every allocation over 128 KiB
/// is a fresh mmap that the kernel zero-fills on first touch and unmaps on free: 22% of a training
/// step went to `clear_page`. (mimalloc was tried and was slower still; see BENCHMARKS.md.)
/// `single_arena` is for tensor work; table work (polars allocates from every worker thread) keeps
/// glibc's per-thread arenas, which one arena would serialise on its lock.
pub fn tune_allocator(single_arena: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
        // One arena: per-thread arenas live in 64 MiB heaps that glibc shrinks eagerly, which
        // brings the zero-fill faults back.
        if single_arena {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = single_arena;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_465_938.5), "2026-11-23T20:32:18.500Z");
        assert_eq!(compact_timestamp(1_795_465_938.5), "20261123T203218");
    }

    #[test]
    fn canonical_sorts_keys() {
        #[derive(Serialize)]
        struct S {
            b: u32,
            a: u32,
        }
        assert_eq!(canonical_json(&S { b: 1, a: 2 }), br#"{"a":2,"b":1}"#);
    }
}
