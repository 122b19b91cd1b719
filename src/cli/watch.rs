//! `flowlens watch`: subscribes to a flowlens agent over gRPC and prints flows as they end, as a table or JSON lines, reconnecting when asked to.

use std::future::Future;
use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::cli::client::{describe, end_reason_arg, EndMatch, FlowQuery};
use crate::record::api::proto;
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
    /// When the agent goes away (restart, crash), keep trying to reconnect with backoff
    /// instead of exiting; the records a restarted agent kept are replayed.
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
    /// resume where an earlier watch stopped.
    #[arg(long, value_name = "N", env = "FLOWLENS_WATCH_AFTER_SEQ")]
    pub after_seq: Option<u64>,
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
    /// The server ended the stream (agent stopping, or the replay is over).
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
    // The start time of the agent we last streamed from, to tell a restart from a blip.
    let mut agent_started: Option<SystemTime> = None;
    let mut reconnecting = false;
    loop {
        let attempt = async {
            let mut client = args.query.agent.connect().await?;
            let started = client
                .get_status(proto::GetStatusRequest {})
                .await
                .ok()
                .and_then(|s| s.into_inner().started)
                .and_then(|t| SystemTime::try_from(t).ok());
            let mut req = req.clone();
            if reconnecting {
                // Only a restarted agent's records are replayed: its ring holds nothing
                // this watch has seen, so all of them (since the epoch).
                let restarted = started.is_some() && started != agent_started;
                req.replay = 0;
                req.since = restarted.then(|| UNIX_EPOCH.into());
                req.follow = Some(true);
            }
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
            anyhow::Ok((stream, started))
        };
        let connected = tokio::select! {
            _ = &mut stop => return Ok(()),
            c = attempt => c,
        };
        let (stream, started) = match connected {
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
            let restarted = started.is_some() && started != agent_started;
            eprintln!(
                "flowlens watch: reconnected to {server}{}",
                if restarted {
                    "; the agent had restarted: replaying the records it kept"
                } else {
                    "; records ended while disconnected were missed"
                }
            );
        }
        agent_started = started;
        if let Err(e) = renderer.header(out).and_then(|()| out.flush()) {
            return quiet_pipe(e);
        }
        let began = Instant::now();
        match follow(stream, &keep, &mut renderer, out, &mut stop).await {
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
                )
            }
            Ended::Lost(why) => {
                eprintln!("flowlens watch: stream from {server} lost ({why}); reconnecting")
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
        reconnecting = true;
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

/// Prints one subscription's records until it ends.
async fn follow(
    mut stream: tonic::Streaming<proto::SubscribeResponse>,
    keep: &Keep,
    renderer: &mut Renderer,
    out: &mut impl Write,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Ended {
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
            Some(proto::subscribe_response::Event::Flows(batch)) => {
                last = Instant::now();
                match print_batch(&batch, keep, renderer, out) {
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
            Some(proto::subscribe_response::Event::Lost(lost)) => {
                eprintln!(
                    "flowlens watch: LOST {} flow records ({})",
                    lost.count,
                    match lost.reason() {
                        proto::LostReason::QueueFull =>
                            "queue full: this client did not read fast enough",
                        proto::LostReason::Unspecified => "unspecified reason",
                    }
                );
            }
            None => {}
        }
    }
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
) -> io::Result<bool> {
    for p in &batch.records {
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
            renderer.record(out, &rec)?;
        }
    }
    out.flush()?;
    Ok(true)
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
