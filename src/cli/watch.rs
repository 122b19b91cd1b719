//! `flowlens watch`: subscribes to a flowlens agent over gRPC and prints flows as they end, as a table or JSON lines, reconnecting when asked to.

use std::future::Future;
use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::cli::client::{describe, end_reason_arg, EndMatch, FlowQuery};
use crate::record::api::proto;
use crate::record::encoding::Stamp;
use crate::record::flow::FlowRecord;
use crate::record::render::{self, Format, Renderer, TableStyle, TimeFormat};

/// First wait before reconnecting, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// With `--until`: how long after that time (and after the last record emitted before
/// it) the watch waits for records still on their way (batches leave the agent within
/// ~100 ms of their first record).
const UNTIL_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub query: FlowQuery,
    /// End reason: idle_timeout, active_timeout, tcp_fin, tcp_rst, shutdown, evicted, or the
    /// table's idle, actv, fin, rst, rst-c, rst-s, rst-cs, refused, stop, evict (repeatable).
    #[arg(
        long,
        value_name = "REASON",
        env = "FLOWLENS_WATCH_END_REASON",
        value_delimiter = ','
    )]
    pub end_reason: Vec<String>,
    /// Print one JSON object per line instead of a table.
    #[arg(long, env = "FLOWLENS_WATCH_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub table: TableArgs,
    /// When the stream breaks (a dropped connection, an agent restart or crash), keep
    /// trying to reconnect with backoff instead of exiting, and resume after the last
    /// record printed: nothing twice, and what could not be had is said on stderr.
    #[arg(long, env = "FLOWLENS_WATCH_RECONNECT")]
    pub reconnect: bool,

    /// First print up to N recent matching flows kept by the agent.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        env = "FLOWLENS_WATCH_REPLAY"
    )]
    pub replay: u32,
    /// First print the kept records emitted since then: a duration ago (30s, 5m, 1h) or a
    /// time (2026-11-25T20:03:00Z, or "2026-11-25 20:03" in --time-format's zone).
    #[arg(long, value_name = "TIME", env = "FLOWLENS_WATCH_SINCE")]
    pub since: Option<String>,
    /// Only records emitted up to then (same forms as --since); the watch ends once the
    /// agent's records pass it.
    #[arg(long, value_name = "TIME", env = "FLOWLENS_WATCH_UNTIL")]
    pub until: Option<String>,
    /// First print the kept flows emitted after record number N (a record's `seq`), to
    /// resume where an earlier watch stopped; give that record's `run` with --run.
    #[arg(long, value_name = "N", env = "FLOWLENS_WATCH_AFTER_SEQ")]
    pub after_seq: Option<u64>,
    /// The agent run --after-seq counts in (a record's `run`): if the agent restarted
    /// since, watch says so and prints what the new run still holds instead.
    #[arg(
        long,
        value_name = "ID",
        env = "FLOWLENS_WATCH_RUN",
        requires = "after_seq"
    )]
    pub run: Option<u64>,
    /// Exit after the replay instead of following new flows.
    #[arg(long, env = "FLOWLENS_WATCH_NO_FOLLOW")]
    pub no_follow: bool,
}

/// How the table looks: the flags `watch` and `flows` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TableArgs {
    /// Table: every column, unabbreviated.
    #[arg(long, env = "FLOWLENS_WATCH_WIDE")]
    pub wide: bool,
    /// Table: print a legend of the columns and abbreviations before the header.
    #[arg(long, env = "FLOWLENS_WATCH_LEGEND")]
    pub legend: bool,
    /// Table: no header and no date lines, rows only.
    #[arg(long, env = "FLOWLENS_WATCH_NO_HEADER")]
    pub no_header: bool,
    /// Table: times in UTC, the local time zone, or Unix seconds.
    #[arg(long, value_enum, env = "FLOWLENS_WATCH_TIME_FORMAT", default_value_t = TimeFormat::Utc)]
    pub time_format: TimeFormat,
}

impl TableArgs {
    /// The table style, as wide as the terminal on stdout.
    pub fn style(&self) -> TableStyle {
        TableStyle {
            wide: self.wide,
            legend: self.legend,
            no_header: self.no_header,
            time: self.time_format,
            width: render::stdout_width(),
            ..TableStyle::default()
        }
    }
}

/// Subscribes and prints until Ctrl-C (exit 0) or the stream ends; a broken stream is an
/// error unless `--reconnect`.
pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the watch runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered now, before the first output: a Ctrl-C at any point
        // from here on ends the watch cleanly instead of killing it.
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let stop = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        let mut out = io::BufWriter::new(io::stdout().lock());
        watch_to(&args, &mut out, stop).await
    })
}

/// How one subscription ended.
enum Ended {
    /// The server ended the stream (agent stopping, after every record; or the replay is
    /// over).
    Closed,
    /// The caller's stop signal.
    Stopped,
    /// Output went away (e.g. piped into `head`): a normal way to stop.
    OutputGone,
    /// The records passed `--until`.
    Until,
    /// The connection broke; the message says how.
    Lost(String),
}

/// The last record printed: where a reconnected stream resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    run: u64,
    seq: u64,
}

/// The body of `run`, with the output and the stop signal supplied by the caller.
pub async fn watch_to(
    args: &WatchArgs,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let req = subscribe_request(args)?;
    let server = &args.query.agent.server;
    let style = args.table.style();
    let keep = Keep::of(args)?;
    let mut renderer = Renderer::styled(
        if args.json {
            Format::Json
        } else {
            Format::Table
        },
        style,
    );
    tokio::pin!(stop);
    let mut backoff = BACKOFF_FIRST;
    // Where to resume: the last record printed or, before the first, where the first
    // stream began.
    let mut at: Option<Position> = args
        .after_seq
        .zip(args.run)
        .map(|(seq, run)| Position { run, seq });
    // How the previous stream ended, once there was one.
    let mut previous: Option<bool> = None;
    loop {
        let reconnecting = previous.is_some();
        let attempt = async {
            let mut client = args.query.agent.connect().await?;
            let mut req = req.clone();
            // After the last record printed; before any, the request as first made.
            if let Some(p) = at.filter(|_| reconnecting) {
                req.replay = 0;
                req.since = None;
                req.follow = Some(true);
                req.after_seq = Some(p.seq);
                req.run = Some(p.run);
            }
            // Where a stream that replays nothing begins (the agent's run and its latest
            // seq), so that a drop before the first record still resumes exactly. Asked
            // before subscribing: a record published in between comes again after a drop
            // only if it was never printed.
            let begins = if args.reconnect && at.is_none() && !subscribe_replays(&req) {
                client
                    .get_status(proto::GetStatusRequest {})
                    .await
                    .ok()
                    .map(|s| s.into_inner())
                    .filter(|s| s.run != 0)
                    .map(|s| Position {
                        run: s.run,
                        seq: s.records_published,
                    })
            } else {
                None
            };
            let stream = client
                .subscribe(req)
                .await
                .map_err(|s| {
                    let text = describe(&s);
                    let hint = if crate::cli::client::is_transport_failure(&s) {
                        crate::cli::client::transport_hint(
                            &crate::cli::client::server_uri(server),
                            &text,
                        )
                    } else {
                        ""
                    };
                    anyhow::anyhow!("subscribing at {server}: {text}{hint}")
                })?
                .into_inner();
            anyhow::Ok((stream, begins))
        };
        let connected = tokio::select! {
            _ = &mut stop => return Ok(()),
            c = attempt => c,
        };
        let (stream, begins) = match connected {
            Ok(c) => c,
            Err(e) if reconnecting => {
                eprintln!("flowlens watch: {e:#}; retrying in {backoff:?}");
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(e) => return Err(e),
        };
        if reconnecting {
            match at {
                Some(p) => eprintln!(
                    "flowlens watch: reconnected to {server}; resuming after record {} of run {}",
                    p.seq, p.run
                ),
                None if subscribe_replays(&req) => eprintln!(
                    "flowlens watch: reconnected to {server}; nothing was printed yet: asking again"
                ),
                None => eprintln!(
                    "flowlens watch: reconnected to {server}; records ended while disconnected \
                     were missed (the agent did not say where the stream was)"
                ),
            }
        }
        at = at.or(begins);
        if let Err(e) = renderer.header(out).and_then(|()| out.flush()) {
            return quiet_pipe(e);
        }
        let began = Instant::now();
        let ended = follow(
            stream,
            &keep,
            &mut renderer,
            out,
            &mut stop,
            &mut at,
            previous,
        )
        .await;
        match ended {
            Ended::Stopped | Ended::OutputGone | Ended::Until => return Ok(()),
            Ended::Closed if !args.reconnect || req.follow == Some(false) => {
                if req.follow != Some(false) {
                    eprintln!("flowlens watch: the server ended the stream");
                }
                return Ok(());
            }
            Ended::Lost(why) if !args.reconnect => {
                bail!("stream from {server} lost: {why}")
            }
            Ended::Closed => {
                eprintln!(
                    "flowlens watch: {server} ended the stream (agent stopping?); reconnecting"
                );
                previous = Some(true);
            }
            Ended::Lost(why) => {
                eprintln!("flowlens watch: stream from {server} lost ({why}); reconnecting");
                previous = Some(false);
            }
        }
        // A stream that ended soon after it began waits out the backoff like a failed
        // connect: a server that ends every stream at once must not make a busy loop of it.
        if began.elapsed() < BACKOFF_MAX {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            backoff = BACKOFF_FIRST;
        }
    }
}

/// What the client keeps of the records the agent sends: the finer reset labels of
/// `--end-reason`, and `--until`.
#[derive(Debug, Clone, Default)]
struct Keep {
    /// Empty: every end reason the agent sends.
    ends: Vec<EndMatch>,
    until: Option<SystemTime>,
}

impl Keep {
    fn of(a: &WatchArgs) -> anyhow::Result<Keep> {
        Ok(Keep {
            ends: end_matches(&a.end_reason)?,
            until: a
                .until
                .as_deref()
                .map(|s| time_arg(s, "--until", a.table.time_format))
                .transpose()?,
        })
    }

    fn wants(&self, r: &FlowRecord) -> bool {
        self.ends.is_empty() || self.ends.iter().any(|e| e.matches(r))
    }

    /// Whether `r` comes after `--until`: records arrive in emission order, so nothing
    /// after it is wanted either.
    fn past(&self, r: &FlowRecord) -> bool {
        self.until.is_some_and(|u| r.emitted > u)
    }

    /// When to stop waiting for records: `UNTIL_GRACE` after `--until` and after the
    /// last record, whichever is later.
    fn deadline(&self, last: Instant) -> Option<Instant> {
        let u = self.until?;
        let left = u.duration_since(SystemTime::now()).unwrap_or_default();
        Some((Instant::now() + left).max(last) + UNTIL_GRACE)
    }
}

fn end_matches(values: &[String]) -> anyhow::Result<Vec<EndMatch>> {
    values.iter().map(|s| end_reason_arg(s)).collect()
}

/// Prints one subscription's records until it ends, keeping `at` on the last one printed.
/// `previous`: whether the previous stream of this watch (if any) ended with the server's
/// OK, after every record its agent had.
async fn follow(
    mut stream: tonic::Streaming<proto::SubscribeResponse>,
    keep: &Keep,
    renderer: &mut Renderer,
    out: &mut impl Write,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    at: &mut Option<Position>,
    previous: Option<bool>,
) -> Ended {
    use proto::subscribe_response::Event;
    let mut last = Instant::now();
    loop {
        let until = async {
            match keep.deadline(last) {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            _ = stop.as_mut() => return Ended::Stopped,
            _ = until => return Ended::Until,
            msg = stream.message() => msg,
        };
        let event = match msg {
            Ok(Some(m)) => m.event,
            Ok(None) => return Ended::Closed,
            Err(s) => return Ended::Lost(describe(&s)),
        };
        match event {
            Some(Event::Flows(batch)) => {
                last = Instant::now();
                match print_batch(&batch, keep, renderer, out, at) {
                    Ok(true) => {}
                    Ok(false) => return Ended::Until,
                    Err(e) => {
                        return match quiet_pipe(e) {
                            Ok(()) => Ended::OutputGone,
                            Err(e) => Ended::Lost(format!("{e:#}")),
                        }
                    }
                }
            }
            Some(Event::Lost(lost)) => eprintln!("flowlens watch: {}", lost_text(&lost)),
            Some(Event::Restarted(r)) => {
                eprintln!("flowlens watch: {}", restart_text(&r, *at, previous));
                *at = Some(Position {
                    run: r.run,
                    seq: r.first_seq.saturating_sub(1),
                });
            }
            None => {}
        }
    }
}

/// A `Lost` event in words: how many, which records, why.
fn lost_text(lost: &proto::Lost) -> String {
    let range = if lost.first_seq > 0 {
        format!(" (records {}..={})", lost.first_seq, lost.last_seq)
    } else {
        String::new()
    };
    let why = match lost.reason() {
        proto::LostReason::QueueFull => {
            "this client fell behind: the agent's buffer let them go before it read them"
        }
        proto::LostReason::NotRetained => {
            "the agent no longer held them when this client resumed (counted before filters)"
        }
        proto::LostReason::FiltersBehind => {
            "the filters could not keep up with the stream (counted before filters)"
        }
        proto::LostReason::Unspecified => "unspecified reason",
    };
    format!("LOST {} flow records{range}: {why}", lost.count)
}

/// A `Restarted` event in words: what of the old run and of the new one was missed.
fn restart_text(r: &proto::Restarted, at: Option<Position>, previous: Option<bool>) -> String {
    let old = match (at, previous) {
        (Some(p), Some(true)) => format!(
            "run {} ended cleanly after record {}: nothing of it was missed",
            p.run, p.seq
        ),
        (Some(p), Some(false)) => format!(
            "records run {} emitted after record {} and had not sent, if any, were lost with it",
            p.run, p.seq
        ),
        (Some(p), None) => format!(
            "what run {} emitted after record {}, if anything, is not known to the agent now",
            p.run, p.seq
        ),
        (None, _) => format!("run {} is gone", r.requested_run),
    };
    let new = if r.first_seq <= 1 {
        format!("every record of the new run {} follows", r.run)
    } else {
        format!(
            "the new run {} emitted {} records before the oldest it still holds (records \
             1..={}): missed; record {} on follows",
            r.run,
            r.first_seq - 1,
            r.first_seq - 1,
            r.first_seq
        )
    };
    format!("the agent restarted; {old}; {new}")
}

/// Output going away (e.g. piped into `head`) is a normal way to stop.
fn quiet_pipe(e: io::Error) -> anyhow::Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e).context("writing to stdout")
    }
}

/// Prints the records `keep` wants; false once they passed `--until`.
fn print_batch(
    batch: &proto::FlowBatch,
    keep: &Keep,
    renderer: &mut Renderer,
    out: &mut impl Write,
    at: &mut Option<Position>,
) -> io::Result<bool> {
    for p in &batch.records {
        *at = Some(Position {
            run: p.run,
            seq: p.seq,
        });
        let rec = match FlowRecord::try_from(p) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("flowlens watch: skipping malformed record: {e}");
                continue;
            }
        };
        if keep.past(&rec) {
            out.flush()?;
            return Ok(false);
        }
        if keep.wants(&rec) {
            let stamp = Stamp {
                run: p.run,
                seq: p.seq,
            };
            renderer.record_at(out, stamp, &rec)?;
        }
    }
    out.flush()?;
    Ok(true)
}

/// Whether `req` asks for records emitted before it.
fn subscribe_replays(req: &proto::SubscribeRequest) -> bool {
    req.replay > 0 || req.since.is_some() || req.after_seq.is_some()
}

/// Builds the Subscribe request the flags describe, rejecting bad values by flag name.
pub fn subscribe_request(a: &WatchArgs) -> anyhow::Result<proto::SubscribeRequest> {
    let ends: Vec<_> = end_matches(&a.end_reason)?
        .into_iter()
        .map(|e| e.reason)
        .collect();
    let mut reasons = ends.clone();
    reasons.dedup();
    let (include, exclude) = a.query.filters(&reasons)?;
    let since = a
        .since
        .as_deref()
        .map(|s| time_arg(s, "--since", a.table.time_format).map(prost_types::Timestamp::from))
        .transpose()?;
    Ok(proto::SubscribeRequest {
        include,
        exclude,
        replay: a.replay,
        since,
        follow: Some(!a.no_follow),
        after_seq: a.after_seq,
        run: a.run,
    })
}

/// A point in time as `--since` and `--until` take it: a duration ago (`90s`, `1h30m`), an
/// RFC 3339 time (`2026-11-25T20:03:00Z`, `...+01:00`), a date and time without a zone
/// (`2026-11-25 20:03[:00]`, in the zone `--time-format` names), or Unix seconds.
pub fn time_arg(s: &str, flag: &str, zone: TimeFormat) -> anyhow::Result<SystemTime> {
    use chrono::{NaiveDateTime, TimeZone};
    let s = s.trim();
    if let Ok(ago) = humantime::parse_duration(s) {
        return Ok(SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(UNIX_EPOCH)
            .max(UNIX_EPOCH));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(UNIX_EPOCH + Duration::from_secs_f64(secs));
        }
    }
    let naive = [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .or_else(|| {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    });
    let at = naive.and_then(|n| match zone {
        TimeFormat::Local => chrono::Local
            .from_local_datetime(&n)
            .earliest()
            .map(SystemTime::from),
        TimeFormat::Utc | TimeFormat::Unix => Some(chrono::Utc.from_utc_datetime(&n).into()),
    });
    at.ok_or_else(|| {
        anyhow::anyhow!(
            "{flag} {s:?}: expected a duration ago (90s, 5m, 1h30m), a time \
             (2026-11-25T20:03:00Z, \"2026-11-25 20:03\") or Unix seconds"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restarted(first_seq: u64) -> proto::Restarted {
        proto::Restarted {
            requested_run: 7,
            run: 9,
            started: None,
            first_seq,
        }
    }

    #[test]
    fn a_restart_says_what_of_each_run_was_missed() {
        let at = Some(Position { run: 7, seq: 41 });
        let clean = restart_text(&restarted(1), at, Some(true));
        assert!(
            clean.contains("run 7 ended cleanly after record 41: nothing of it"),
            "{clean}"
        );
        assert!(
            clean.contains("every record of the new run 9 follows"),
            "{clean}"
        );
        let crashed = restart_text(&restarted(101), at, Some(false));
        assert!(
            crashed.contains("emitted after record 41 and had not sent, if any, were lost"),
            "{crashed}"
        );
        assert!(
            crashed.contains("emitted 100 records before the oldest it still holds"),
            "{crashed}"
        );
        assert!(crashed.contains("record 101 on follows"), "{crashed}");
        let first = restart_text(&restarted(1), at, None);
        assert!(first.contains("is not known to the agent now"), "{first}");
    }

    #[test]
    fn a_loss_names_its_records_and_why() {
        let lost = proto::Lost {
            count: 3,
            reason: proto::LostReason::NotRetained.into(),
            first_seq: 11,
            last_seq: 13,
        };
        let text = lost_text(&lost);
        assert!(
            text.starts_with("LOST 3 flow records (records 11..=13): "),
            "{text}"
        );
        assert!(text.contains("no longer held them"), "{text}");
    }
}
