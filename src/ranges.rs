//! The documented range of every number and duration flag (and the check of each free-form value that needs one), in one table, checked once after parsing: a bad value gets one sentence naming the flag, or the `FLOWLENS_*` variable it came from.
//!
//! A new flag joins with one line in [`TABLE`] (its long name and its [`Check`]); a
//! number or duration flag without one fails the tests (`unchecked`). `--help` shows each
//! range, and booleans read from the environment take `1/0`, `true/false`, `yes/no`
//! (and `on/off`) through [`prepare`].

use std::any::TypeId;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

use crate::config::HumanDuration;

/// What a flag's value must be.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// A duration in the flags' grammar, from the first to the second, both included.
    Duration(Duration, Duration),
    /// A whole number, from the first to the second, both included.
    Count(u64, u64),
    /// Anything else: what it must be (for `--help`, None to say nothing there), and the
    /// check, returning why a value is refused.
    Value(Option<&'static str>, fn(&str) -> Result<(), String>),
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const MINUTE: Duration = secs(60);
const HOUR: Duration = secs(3600);
const DAY: Duration = secs(86_400);
const WEEK: Duration = secs(7 * 86_400);
/// Entries of a flow map: 16 Mi (the default is 64 Ki).
const MAX_MAP: u64 = 1 << 24;
const U32: u64 = u32::MAX as u64;

/// Every checked flag of every subcommand, by long name.
pub const TABLE: &[(&str, Check)] = &[
    // run: the poller
    ("poll-interval", Check::Duration(ms(10), HOUR)),
    ("idle-timeout-tcp", Check::Duration(secs(1), WEEK)),
    ("idle-timeout-udp", Check::Duration(secs(1), WEEK)),
    ("idle-timeout-icmp", Check::Duration(secs(1), WEEK)),
    ("idle-timeout-other", Check::Duration(secs(1), WEEK)),
    ("tcp-close-grace", Check::Duration(ms(100), HOUR)),
    ("active-timeout", Check::Duration(secs(1), WEEK)),
    ("scan-threads", Check::Count(1, 64)),
    ("max-flows", Check::Count(1, MAX_MAP)),
    ("max-tcp-flows", Check::Count(1, MAX_MAP)),
    ("max-icmp-flows", Check::Count(1, MAX_MAP)),
    ("max-local-flows", Check::Count(1, MAX_MAP)),
    ("observer-id", Check::Value(None, observer_id)),
    // run: gRPC
    ("grpc-listen", Check::Value(None, grpc_listen)),
    ("grpc-socket-group", Check::Value(None, socket_group)),
    ("grpc-max-subscribers", Check::Count(1, 65_536)),
    ("grpc-max-connections", Check::Count(1, 1 << 20)),
    ("grpc-max-connections-per-source", Check::Count(1, 1 << 20)),
    ("grpc-handshake-timeout", Check::Duration(secs(1), MINUTE)),
    ("grpc-max-streams-per-connection", Check::Count(1, 1024)),
    ("grpc-max-filters", Check::Count(1, 65_536)),
    ("grpc-max-string-length", Check::Count(1, 65_536)),
    ("grpc-max-request-size", Check::Count(1024, 64 << 20)),
    ("grpc-keepalive-interval", Check::Duration(secs(1), HOUR)),
    (
        "grpc-keepalive-timeout",
        Check::Duration(secs(1), secs(600)),
    ),
    (
        "grpc-tcp-keepalive",
        Check::Duration(secs(1), secs(2 * 3600)),
    ),
    ("grpc-idle-timeout", Check::Duration(secs(1), WEEK)),
    // run: the hub and its sinks
    (
        "buffer-memory",
        Check::Value(Some("64KiB to 64GiB"), buffer_memory),
    ),
    ("replay-ring", Check::Count(1, 10_000_000)),
    ("ipfix-observation-domain", Check::Count(0, U32)),
    (
        "ipfix-mtu",
        Check::Count(crate::sinks::ipfix::MIN_MTU as u64, 65_535),
    ),
    ("ipfix-template-refresh", Check::Duration(secs(1), DAY)),
    ("ipfix-enterprise", Check::Count(1, U32)),
    // the clients
    ("interval", Check::Duration(ms(100), HOUR)),
    ("replay", Check::Count(0, U32)),
    ("after-seq", Check::Count(0, u64::MAX)),
    ("run", Check::Count(0, u64::MAX)),
    ("min-bytes", Check::Count(0, u64::MAX)),
    ("pid", Check::Count(1, U32)),
    ("limit", Check::Count(1, u64::MAX)),
];

fn observer_id(s: &str) -> Result<(), String> {
    if s.len() > 255 {
        return Err(format!(
            "is {} bytes; an observer id has at most 255",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "contains the control character {c:?}; use printable characters"
        ));
    }
    Ok(())
}

fn buffer_memory(s: &str) -> Result<(), String> {
    use crate::config::ByteSize;
    let b: ByteSize = s.parse()?;
    let (min, max) = (ByteSize(crate::hub::MIN_BUFFER_MEMORY), ByteSize(64 << 30));
    if b.0 < min.0 || b.0 > max.0 {
        return Err(format!("{b} is outside {min} to {max}"));
    }
    Ok(())
}

fn grpc_listen(s: &str) -> Result<(), String> {
    if s == "off" {
        return Ok(());
    }
    s.parse::<crate::sinks::grpc::ListenAddr>()
        .map(drop)
        .map_err(|e| crate::fatal::describe(&e))
}

fn socket_group(s: &str) -> Result<(), String> {
    crate::sinks::grpc::listener::group_id(s)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn entry(long: &str) -> Option<Check> {
    TABLE.iter().find(|(l, _)| *l == long).map(|(_, c)| *c)
}

fn range_text(check: &Check) -> Option<String> {
    let d = |d: &Duration| humantime::format_duration(*d).to_string();
    match check {
        Check::Duration(lo, hi) => Some(format!("{} to {}", d(lo), d(hi))),
        Check::Count(lo, hi) => Some(format!("{lo} to {hi}")),
        Check::Value(what, _) => what.map(str::to_owned),
    }
}

/// Why `raw` is refused, if it is.
fn refusal(check: &Check, raw: &str) -> Option<String> {
    let out_of_range = || {
        format!(
            " is out of range: give {}",
            range_text(check).unwrap_or_default()
        )
    };
    match check {
        Check::Duration(lo, hi) => {
            let d = humantime::parse_duration(raw).ok()?;
            (d < *lo || d > *hi).then(out_of_range)
        }
        Check::Count(lo, hi) => {
            let n: u64 = raw.parse().ok()?;
            (n < *lo || n > *hi).then(out_of_range)
        }
        Check::Value(_, f) => f(raw).err().map(|why| format!(": {why}")),
    }
}

/// The command line as `main` parses it: every range in its flag's help, and booleans read
/// from the environment in the forms people write (clap's own parser takes only
/// `true`/`false` there).
pub fn prepare(cmd: Command) -> Command {
    let cmd = cmd.mut_args(|a| {
        let boolean = matches!(a.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        if boolean && a.get_env().is_some() {
            return a.value_parser(clap::builder::BoolishValueParser::new());
        }
        let Some(range) = a.get_long().and_then(entry).as_ref().and_then(range_text) else {
            return a;
        };
        let add = |h: Option<&clap::builder::StyledStr>| {
            h.map(|h| format!("{} (range: {range})", h.to_string().trim_end_matches('.')))
        };
        let (help, long_help) = (add(a.get_help()), add(a.get_long_help()));
        let a = match help {
            Some(h) => a.help(h),
            None => a,
        };
        match long_help {
            Some(h) => a.long_help(h),
            None => a,
        }
    });
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    subs.iter()
        .fold(cmd, |cmd, name| cmd.mut_subcommand(name, prepare))
}

/// Checks the values `m` holds for `cmd`'s arguments against [`TABLE`]: one sentence
/// naming the flag (or the variable the value came from) for the first that is refused.
pub fn check(cmd: &Command, m: &ArgMatches) -> Result<(), String> {
    for arg in cmd.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        let Some(check) = entry(long) else { continue };
        let source = m.value_source(id);
        if matches!(source, None | Some(ValueSource::DefaultValue)) {
            continue;
        }
        let Some(raws) = m.get_raw(id) else { continue };
        for raw in raws {
            let raw = raw.to_string_lossy();
            let Some(why) = refusal(&check, &raw) else {
                continue;
            };
            let var = arg.get_env().map(|v| v.to_string_lossy().into_owned());
            return Err(match (source, var) {
                (Some(ValueSource::EnvVariable), Some(var)) => {
                    format!("{var}={raw:?} (--{long}){why}")
                }
                _ => format!("--{long} {raw:?}{why}"),
            });
        }
    }
    Ok(())
}

/// The number and duration arguments of `cmd` and its subcommands that [`TABLE`] has no
/// range for (a test keeps this empty).
pub fn unchecked(cmd: &Command) -> Vec<String> {
    let numeric = [
        TypeId::of::<HumanDuration>(),
        TypeId::of::<crate::config::ByteSize>(),
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
    ];
    let mut missing: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.get_action().takes_values())
        .filter(|a| numeric.iter().any(|t| a.get_value_parser().type_id() == *t))
        .filter(|a| a.get_long().and_then(entry).is_none())
        .map(|a| format!("{} --{}", cmd.get_name(), a.get_long().unwrap_or("?")))
        .collect();
    for sub in cmd.get_subcommands() {
        missing.extend(unchecked(sub));
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_as_documented() {
        let poll = entry("poll-interval").unwrap();
        assert_eq!(range_text(&poll).as_deref(), Some("10ms to 1h"));
        assert_eq!(refusal(&poll, "10ms"), None);
        assert_eq!(refusal(&poll, "1h"), None);
        assert_eq!(
            refusal(&poll, "1ns").as_deref(),
            Some(" is out of range: give 10ms to 1h")
        );
        assert!(refusal(&poll, "100000000000h").is_some());
        let idle = entry("idle-timeout-udp").unwrap();
        assert_eq!(range_text(&idle).as_deref(), Some("1s to 7days"));
        assert!(refusal(&idle, "8days").is_some());
        assert!(refusal(&entry("max-flows").unwrap(), "0").is_some());
        assert!(refusal(&entry("max-flows").unwrap(), "16777216").is_none());
    }

    #[test]
    fn observer_ids_are_printable_and_short() {
        assert!(observer_id("rack12-host3 (eu)").is_ok());
        assert!(observer_id("a\nb").unwrap_err().contains("'\\n'"));
        assert!(observer_id(&"x".repeat(256))
            .unwrap_err()
            .contains("256 bytes"));
        assert!(observer_id(&"é".repeat(127)).is_ok());
    }

    #[test]
    fn unix_socket_paths_fit_sun_path() {
        let long = format!("unix:/{}", "s".repeat(107));
        let err = grpc_listen(&long).unwrap_err();
        assert!(
            err.contains("108 bytes") && err.contains("at most 107"),
            "{err}"
        );
        assert!(grpc_listen(&format!("unix:/{}", "s".repeat(106))).is_ok());
        assert!(grpc_listen("off").is_ok());
    }
}
