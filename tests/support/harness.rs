//! The test harness of the suites that share one environment (libtest-mimic): starts the
//! environment once, runs the selected tests, stops and removes everything, and reports like
//! `cargo test`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

use super::{Env, Result, phase};

/// A test of a shared environment of type `E`.
pub type TestFnOf<E> = fn(Arc<E>) -> Pin<Box<dyn Future<Output = Result<()>> + Send>>;
/// A test of the shared end-to-end environment.
pub type TestFn = TestFnOf<Env>;

/// Names and functions of tests, for [`run`].
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|env| Box::pin($name(env))) as $crate::support::harness::TestFnOf<_>)),*]
    };
}

/// Runs `cases` against one environment, `threads` at a time unless `--test-threads` says
/// otherwise. Exits the process with the result.
pub fn run(suite: &str, cases: Vec<(&'static str, TestFn)>, threads: usize) -> ! {
    run_in(suite, cases, threads, || Box::pin(Env::start()))
}

/// [`run`] with an environment of any type, started by `start`.
pub fn run_in<E: Send + Sync + 'static>(
    suite: &str,
    cases: Vec<(&'static str, TestFnOf<E>)>,
    threads: usize,
    start: impl FnOnce() -> Pin<Box<dyn Future<Output = Result<E>> + Send>>,
) -> ! {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(threads);
    }
    let selected = cases
        .iter()
        .any(|(name, _)| args.filter.as_deref().is_none_or(|f| if args.exact { *name == f } else { name.contains(f) }));
    if args.list || !selected {
        let trials = cases.iter().map(|(name, _)| Trial::test(*name, || Ok(()))).collect();
        libtest_mimic::run(&args, trials).exit();
    }

    registry_access_operator::keycloak::token::install_crypto_provider();
    let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime"));
    let t = Instant::now();
    let env = match rt.block_on(start()) {
        Ok(env) => Arc::new(env),
        Err(e) => {
            // Fail loudly: a missing tool is a failure, never a skip.
            eprintln!("[{suite}] the end-to-end environment did not start: {e}");
            std::process::exit(1);
        }
    };
    phase("environment ready", t);

    let trials = cases
        .into_iter()
        .map(|(name, f)| {
            let (env, rt) = (env.clone(), rt.clone());
            Trial::test(name, move || {
                let t = Instant::now();
                let result = rt.block_on(f(env));
                phase(name, t);
                result.map_err(|e| Failed::from(e.to_string()))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let t = Instant::now();
    match Arc::try_unwrap(env) {
        Ok(env) => drop(env),
        Err(_) => eprintln!("[{suite}] environment still referenced at exit"),
    }
    phase("environment stopped and removed", t);
    conclusion.exit();
}
