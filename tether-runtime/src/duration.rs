//! Durations as people read and write them: `90d`, `24h`, `1h 30m`, `4m 12s`, in the units
//! the config and flags accept (humantime's own output counts months of 30.44 days and prints
//! `90d` as `2months 29days 2h 52m 48s`).

use std::time::Duration;

/// `d` exactly, in days (from two days on), hours, minutes and seconds; zero parts left out.
/// Below a second: milliseconds.
pub fn human(d: Duration) -> String {
    parts(d, usize::MAX)
}

/// `d` to its two largest units (`2d 3h`, `4m 12s`): for ages and uptimes, where the rest is
/// noise.
pub fn approx(d: Duration) -> String {
    parts(d, 2)
}

fn parts(d: Duration, most: usize) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.subsec_millis());
    }
    let (days, rest) = if secs >= 2 * 86_400 {
        (secs / 86_400, secs % 86_400)
    } else {
        (0, secs)
    };
    let units = [
        (days, "d"),
        (rest / 3600, "h"),
        (rest % 3600 / 60, "m"),
        (rest % 60, "s"),
    ];
    let first = units.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    units[first..]
        .iter()
        .take(most)
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_written() {
        let h = |s: u64| human(Duration::from_secs(s));
        assert_eq!(h(90 * 86_400), "90d");
        assert_eq!(h(365 * 86_400), "365d");
        assert_eq!(h(86_400), "24h");
        assert_eq!(h(36 * 3600), "36h");
        assert_eq!(h(5400), "1h 30m");
        assert_eq!(h(252), "4m 12s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(
            approx(Duration::from_secs(2 * 86_400 + 3 * 3600 + 7)),
            "2d 3h"
        );
        assert_eq!(approx(Duration::from_secs(3600 + 7)), "1h");
    }
}
