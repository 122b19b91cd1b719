//! The terminal a full-screen client reads keys from: waits for input itself, so a terminal that went away (hangup, EOF, EIO) ends the client instead of spinning, and turns SIGHUP and SIGTERM into a prompt end.
//!
//! crossterm's reader retries a read that returns 0 (EOF) or EIO in a loop, without looking
//! at its timeout: once the terminal hangs up, a call into it never returns and burns a core.
//! So the client calls it only after `poll(2)` on the terminal said input is waiting and the
//! terminal has not hung up; a hung-up terminal always polls as `POLLHUP`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event};
use signal_hook::consts::{SIGHUP, SIGTERM};
use signal_hook::iterator::Signals;

/// How long the client has to restore the terminal and exit after SIGHUP or SIGTERM before
/// the process ends without it (it may be inside a terminal call that never returns).
const EXIT_DEADLINE: Duration = Duration::from_secs(1);

/// What waiting for input found.
#[derive(Debug)]
pub enum Input {
    /// Nothing within the wait, or a signal interrupted it.
    Idle,
    Event(Event),
    /// The terminal hung up or failed: the client should end.
    Gone(String),
}

/// The terminal crossterm reads: standard input when it is one, else `/dev/tty`.
pub struct Terminal {
    fd: RawFd,
    _tty: Option<File>,
    stop: Arc<AtomicBool>,
}

impl Terminal {
    /// Finds the terminal and installs the SIGHUP/SIGTERM handling: the first sets the stop
    /// flag, and the process exits by itself `EXIT_DEADLINE` later if it has not.
    pub fn open() -> io::Result<Terminal> {
        let tty = if std::io::IsTerminal::is_terminal(&io::stdin()) {
            None
        } else {
            Some(File::open("/dev/tty")?)
        };
        let fd = tty.as_ref().map_or(libc::STDIN_FILENO, |f| f.as_raw_fd());
        let stop = Arc::new(AtomicBool::new(false));
        let mut signals = Signals::new([SIGHUP, SIGTERM])?;
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("flowlens-signals".into())
            .spawn(move || {
                // Blocks until a signal: nothing here wakes otherwise.
                if let Some(sig) = signals.forever().next() {
                    flag.store(true, Ordering::SeqCst);
                    std::thread::sleep(EXIT_DEADLINE);
                    std::process::exit(128 + sig);
                }
            })?;
        Ok(Terminal {
            fd,
            _tty: tty,
            stop,
        })
    }

    /// Whether SIGHUP or SIGTERM asked the client to end.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits at most `timeout` for a key or another terminal event.
    pub fn next(&self, timeout: Duration) -> Input {
        // Events crossterm already read come first; it is asked only when a poll just found
        // the terminal still there.
        match self.wait(Duration::ZERO) {
            Wait::Gone(why) => return Input::Gone(why),
            Wait::Idle | Wait::Ready => {}
        }
        match crossterm_event() {
            Input::Idle => {}
            other => return other,
        }
        match self.wait(timeout) {
            Wait::Gone(why) => Input::Gone(why),
            Wait::Idle => Input::Idle,
            Wait::Ready => crossterm_event(),
        }
    }

    /// poll(2) on the terminal for at most `timeout`.
    fn wait(&self, timeout: Duration) -> Wait {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, and the count says one.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Wait::Idle,
                _ => Wait::Gone(format!("waiting for the terminal: {e}")),
            };
        }
        if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return Wait::Gone("the terminal went away".into());
        }
        if n == 0 {
            Wait::Idle
        } else {
            Wait::Ready
        }
    }
}

enum Wait {
    Idle,
    Ready,
    Gone(String),
}

/// An event crossterm has, or reads now: only called when the terminal did not poll as
/// hung up, so its read returns.
fn crossterm_event() -> Input {
    match event::poll(Duration::ZERO).and_then(|ready| ready.then(event::read).transpose()) {
        Ok(Some(ev)) => Input::Event(ev),
        Ok(None) => Input::Idle,
        Err(e) => Input::Gone(format!("reading the terminal: {e}")),
    }
}
