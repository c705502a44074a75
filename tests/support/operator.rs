//! The operator's built binary run as a separate process with a kubeconfig, as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use super::Result;
use super::process::Proc;

/// Path of the operator binary cargo built: given to tests by cargo; for the demo (an example,
/// which cargo does not tell), the binary beside the examples folder.
pub fn binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_registry-access-operator") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("registry-access-operator")))
            .unwrap_or_else(|| PathBuf::from("registry-access-operator")),
    }
}

pub struct Operator {
    proc: Option<Proc>,
    pub log: PathBuf,
    kubeconfig: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Operator {
    /// Starts `registry-access-operator run` with debug logs (so that the secrecy checks cover
    /// the most verbose output) and `extra` arguments.
    pub fn start(kubeconfig: &Path, log: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_with_env(kubeconfig, log, extra, &[])
    }

    /// [`Operator::start`] with extra environment variables (e.g. POD_NAME).
    pub fn start_with_env(kubeconfig: &Path, log: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        let mut op = Self {
            proc: None,
            log: log.to_owned(),
            kubeconfig: kubeconfig.to_owned(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        op.start_again()?;
        Ok(op)
    }

    /// Starts the process again after [`Operator::stop`] or [`Operator::kill`]; logs append.
    pub fn start_again(&mut self) -> Result<()> {
        let mut cmd = Command::new(binary());
        cmd.arg("run").arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        if !self.args.iter().any(|a| a.starts_with("--log-level")) {
            cmd.arg("--log-level=info,registry_access_operator=debug");
        }
        // The test Keycloak serves plain http on loopback; a test of the https-only default
        // passes ALLOW_INSECURE_HTTP=false in its environment.
        cmd.env("ALLOW_INSECURE_HTTP", "true")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .env_remove("KUBECONFIG")
            .env_remove("WATCH_NAMESPACE");
        self.proc = Some(Proc::start("operator", cmd, &self.log)?);
        Ok(())
    }

    /// Graceful stop (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// SIGKILL, as a node failure would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGKILL);
            p.kill();
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.proc {
            Some(p) => p.check_alive(),
            None => Err("operator is not running".into()),
        }
    }

    /// The process id while it runs (for /proc readings such as CPU time and memory).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Everything the operator logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}
