//! `warbler-chaos`: runs chaos scenarios against a real Warbler cluster and checks the
//! history. See docs/chaos.md.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use warbler_chaos::driver::Net;
use warbler_chaos::run::{run, RunOpts};
use warbler_chaos::scenario::Scenario;
use warbler_chaos::{checker, history, report};

#[derive(Parser)]
#[command(
    name = "warbler-chaos",
    about = "Kill, pause and cut a real Warbler cluster under load, and check every invariant afterwards"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs scenarios; exits 1 when a run is invalid.
    Run {
        /// Scenario files (TOML), e.g. chaos/scenarios/kill-random.toml.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// The first run's seed (later runs count up from it); default: from the clock.
        #[arg(long)]
        seed: Option<u64>,
        /// Runs per scenario, each with its own seed.
        #[arg(long, default_value_t = 1)]
        runs: u32,
        /// Where histories and results go (one folder per run).
        #[arg(long, default_value = "/tmp/warbler-chaos")]
        out: PathBuf,
        /// auto (network namespaces when root, else loopback), netns or loopback.
        #[arg(long, default_value = "auto")]
        net: String,
        /// The warbler binary; default: the one beside this program.
        #[arg(long)]
        warbler: Option<PathBuf>,
        /// Override every scenario's duration (seconds).
        #[arg(long)]
        duration: Option<f64>,
        /// Start the nodes with a deliberate bug (ack-before-commit or skip-seq), to see the
        /// checker catch it.
        #[arg(long)]
        bug: Option<String>,
    },
    /// Checks a recorded history again.
    Check { history: PathBuf },
}

/// The plotting script, written beside each run's results.
const PLOT: &str = include_str!("../../plot.py");

/// Plots a run's timeline to `timeline.png` with Python's matplotlib, when it is there.
fn plot(dir: &std::path::Path) {
    let script = dir.join("plot.py");
    let png = dir.join("timeline.png");
    let ok = std::fs::write(&script, PLOT).is_ok()
        && std::process::Command::new("python3")
            .arg(&script)
            .arg(dir.join("result.json"))
            .arg(&png)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        println!("  plot: {}", png.display());
    } else {
        println!("  no plot: it needs python3 with matplotlib (python3 -m pip install matplotlib)");
    }
}

fn default_warbler() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("warbler");
    anyhow::ensure!(
        beside.exists(),
        "no warbler binary beside {}; build it (cargo build --release) or pass --warbler PATH",
        me.display()
    );
    Ok(beside)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // On Ctrl-C or SIGTERM the run is dropped, and with it the cluster: its nodes are
    // killed and its network namespaces, bridge and containers removed.
    let outcome = tokio::select! {
        r = main2() => r,
        s = interrupted() => Err(anyhow::anyhow!("stopped by {s}; the cluster was torn down and this run has no result")),
    };
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Waits for SIGINT or SIGTERM and names it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn main2() -> anyhow::Result<bool> {
    match Cli::parse().cmd {
        Cmd::Check { history: path } => {
            let c = checker::check(&history::read(&path)?);
            print!("{}", report::summary(&c));
            Ok(c.valid)
        }
        Cmd::Run {
            scenarios,
            seed,
            runs,
            out,
            net,
            warbler,
            duration,
            bug,
        } => {
            let net = Net::parse(&net)?;
            let warbler = match warbler {
                Some(w) => w,
                None => default_warbler()?,
            };
            let first = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64 % 1_000_000)
                    .unwrap_or(1)
            });
            let mut all_valid = true;
            let mut errored = 0;
            let mut results = Vec::new();
            for path in &scenarios {
                let mut scenario = Scenario::load(path)?;
                if let Some(d) = duration {
                    scenario.duration_s = d;
                }
                for r in 0..runs {
                    let seed = first + u64::from(r);
                    let dir = out.join(format!("{}-{seed}", scenario.name));
                    let res = match run(RunOpts {
                        scenario: scenario.clone(),
                        seed,
                        warbler: warbler.clone(),
                        out: dir.clone(),
                        net,
                        bug: bug.clone(),
                    })
                    .await
                    {
                        Ok(res) => res,
                        Err(e) => {
                            // One run that cannot finish (the cluster never settled, a
                            // node would not start) must not hide the rest of a matrix:
                            // record it for the report and go on; the exit says so.
                            eprintln!("run {} seed {seed} did not finish: {e:#}", scenario.name);
                            std::fs::create_dir_all(&dir)?;
                            let error = serde_json::json!({
                                "scenario": scenario.name,
                                "seed": seed,
                                "bug": bug,
                                "error": format!("{e:#}"),
                            });
                            std::fs::write(
                                dir.join("error.json"),
                                serde_json::to_vec_pretty(&error)?,
                            )?;
                            errored += 1;
                            results.push(dir.join("error.json").display().to_string());
                            continue;
                        }
                    };
                    print!("{}", report::summary(&res.check));
                    if let Some(r) = &res.restore {
                        print!("{}", report::restore_summary(r));
                    }
                    println!("  results: {}", dir.join("result.json").display());
                    plot(&dir);
                    all_valid &= res.check.valid;
                    results.push(dir.join("result.json").display().to_string());
                }
            }
            std::fs::write(out.join("runs.json"), serde_json::to_vec_pretty(&results)?)?;
            anyhow::ensure!(
                errored == 0,
                "{errored} of {} runs did not finish (each says why in its error.json under \
                 {}); replay one with its --seed",
                results.len(),
                out.display()
            );
            Ok(all_valid)
        }
    }
}
