//! Child processes of the environment: started in their own process group with output to a log
//! file, stopped with SIGTERM (then SIGKILL), and killed when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::Result;

/// Time a process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
    /// What was started, to start it again.
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn start(name: &str, cmd: Command, log: &Path) -> Result<Self> {
        let mut p = Self {
            name: name.to_owned(),
            log: log.to_owned(),
            child: None,
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            envs: cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned))).collect(),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = File::options().create(true).append(true).open(&self.log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().map_err(|e| format!("cannot start {} ({:?}): {e}", self.name, self.program))?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the same command again (after [`Proc::stop`] or [`Proc::kill`]).
    pub fn respawn(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Fails with the end of the log when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        Err(format!("{} exited; last log lines:\n{}", self.name, tail(&self.log, 30)).into())
    }

    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            let _ = killpg(Pid::from_raw(pid as i32), signal);
        }
    }

    /// SIGTERM, then SIGKILL after a grace period; waits for the exit.
    pub fn stop(&mut self) {
        if self.running() {
            self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while self.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }

    /// SIGKILL to the whole process group, and wait.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The processes whose parent is `pid` (from /proc/<pid>/stat of every process).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Field 4, after the command name (which may hold spaces), is the parent's pid.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `check` every 200 ms until it returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
