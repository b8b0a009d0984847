//! Every child process of the kit is forked by one long-lived thread.
//!
//! Children must never outlive the test process, even when a test panics or the binary exits with
//! `static` servers that are never dropped. The kernel gives us that through
//! `PR_SET_PDEATHSIG(SIGKILL)`, but the "parent" it watches is the *thread* that forked the child,
//! not the process. Rust's test harness runs every test on its own short-lived thread, so a server
//! forked from a test thread would be SIGKILLed as soon as that test returned, even when a later test
//! still uses it (shared servers, restarts). Hence one spawner thread, started on first use and never
//! stopped: it ends only when the whole process does, which is exactly when the children must die.

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

use crate::error::{Error, Result};

/// A command to fork, and where to send the outcome.
struct SpawnRequest {
    command: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The sending side of the spawner thread's queue, or why the thread could not be started.
fn spawner() -> &'static Result<mpsc::Sender<SpawnRequest>, String> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<SpawnRequest>, String>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                // `rx` never disconnects: its sender lives in a `static`. The loop (and with it the
                // thread the children's PDEATHSIG is tied to) therefore lasts until process exit.
                for SpawnRequest { mut command, reply } in rx {
                    die_with_spawner_thread(&mut command);
                    // The requester may have given up (it cannot here: it blocks on `recv`), so a
                    // failed send only means nobody is left to care about this child.
                    let _ = reply.send(command.spawn());
                }
            })
            .map(|_detached| tx)
            .map_err(|e| format!("could not start the testkit spawner thread: {e}"))
    })
}

/// Spawns `command` on the spawner thread, with PDEATHSIG set so it dies with the test process.
pub(crate) fn spawn(command: Command) -> Result<Child> {
    let described = describe(&command);
    let spawn_error = |source| Error::Spawn {
        command: described.clone(),
        source,
    };
    let sender = spawner()
        .as_ref()
        .map_err(|e| spawn_error(io::Error::other(e.clone())))?;
    let (reply, outcome) = mpsc::sync_channel(1);
    sender
        .send(SpawnRequest { command, reply })
        .map_err(|_| spawn_error(io::Error::other("the testkit spawner thread has stopped")))?;
    outcome
        .recv()
        .map_err(|_| spawn_error(io::Error::other("the testkit spawner thread has stopped")))?
        .map_err(spawn_error)
}

/// Arranges for the kernel to SIGKILL the child when the thread that forks it exits.
///
/// This is the crate's only unsafe code, hence the function-level `allow`.
#[allow(unsafe_code)]
fn die_with_spawner_thread(command: &mut Command) {
    let parent = std::process::id();
    let hook = move || -> io::Result<()> {
        // SAFETY: this runs in the forked child before `exec`, where only async-signal-safe calls
        // are allowed. `prctl` and `getppid` are plain system calls: they neither allocate nor take
        // locks, and the errors below are built from raw OS codes without allocating. The
        // signal number is passed as `c_ulong` because `prctl` is variadic and the kernel reads a
        // full `unsigned long` for it.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died between fork and prctl, no signal will ever come: give up now
            // rather than leave an orphan server behind.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: `pre_exec` is unsafe because the hook runs between fork and exec; the hook above only
    // makes async-signal-safe system calls. std applies `uid`/`gid` *before* running pre_exec
    // hooks, and the kernel clears PDEATHSIG on a credential change, so setting it here (after
    // the switch to the `postgres` user, when running as root) is what keeps it in force.
    unsafe {
        command.pre_exec(hook);
    }
}

/// A shell-like rendering of a command line for error messages.
pub(crate) fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
