//! The chaos harness in CI (docs/chaos.md): a short scenario of kills and a pause against a
//! three-node cluster of real processes must come out valid, and a deliberately broken
//! build must not.

mod common;

use std::path::Path;

use warbler_chaos::driver::Net;
use warbler_chaos::report::summary;
use warbler_chaos::run::{run, RunOpts, RunResult};
use warbler_chaos::scenario::Scenario;

/// One chaos run at a time: each starts its own three-node cluster.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `scenario` from chaos/scenarios, shortened to `duration` seconds, with `env` added
/// to every node's settings.
async fn chaos(
    scenario: &str,
    seed_name: &str,
    bug: Option<&str>,
    (duration, env): (Option<f64>, &[(&str, &str)]),
) -> RunResult {
    let _turn = ONE_AT_A_TIME.lock().await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("chaos/scenarios")
        .join(format!("{scenario}.toml"));
    let mut scenario = Scenario::load(&path).unwrap();
    if let Some(d) = duration {
        scenario.duration_s = d;
    }
    for (k, v) in env {
        scenario.cluster.env.insert(k.to_string(), v.to_string());
    }
    let out = tempfile::tempdir().unwrap();
    let r = run(RunOpts {
        scenario,
        seed: common::seed(seed_name),
        warbler: env!("CARGO_BIN_EXE_warbler").into(),
        out: out.path().to_path_buf(),
        net: Net::auto(),
        bug: bug.map(str::to_string),
    })
    .await
    .unwrap_or_else(|e| panic!("the chaos run failed: {e:#}"));
    print!("{}", summary(&r.check));
    if !r.check.valid && bug.is_none() {
        // Keep the evidence.
        let keep = std::env::temp_dir().join(format!("warbler-chaos-failed-{}", r.seed));
        let _ = std::fs::rename(out.keep(), &keep);
        println!("history and results kept in {}", keep.display());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_a_paused_leader_under_load_break_no_invariant() {
    let r = chaos("ci-short", "chaos-ci-short", None, (None, &[])).await;
    let c = &r.check;
    assert!(r.skipped.is_empty(), "faults not injected: {:?}", r.skipped);
    assert_eq!(c.faults.len(), 3, "two kills and a pause");
    assert!(
        c.acknowledged > 300 && c.delivered >= c.acknowledged,
        "the workload ran: {} acknowledged, {} delivered",
        c.acknowledged,
        c.delivered
    );
    assert!(c.devices >= 24);
    assert!(c.valid, "anomalies: {:?}", c.examples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_sessions_skip_seqs_is_caught() {
    let r = chaos(
        "ci-short",
        "chaos-skip-seq",
        Some("skip-seq"),
        (Some(12.0), &[]),
    )
    .await;
    let c = &r.check;
    assert!(
        !c.valid,
        "the checker missed a build that skips every 50th seq"
    );
    assert!(c.gaps > 0 && c.lost > 0, "gaps {} lost {}", c.gaps, c.lost);
    assert_eq!(
        c.order_violations + c.duplicate_assignments + c.seq_reuse,
        0
    );
}

/// Leaders' write backlog in the CI overload runs: small enough that 12,000 publishes/s
/// offered fill it on any machine (a fast one may keep up with the default 4 MiB).
const CI_BACKLOG: (&str, &str) = ("WARBLER_BACKLOG_BYTES_MAX", "262144");

/// Open loop past saturation (chaos/scenarios/overload.toml, shortened): the hot leader
/// refuses with `overloaded`, publishers resend go-back-N, and the kill and the pause of
/// that leader break no invariant, send order per publisher included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_past_saturation_is_refused_in_order_and_breaks_no_invariant() {
    let r = chaos(
        "overload",
        "chaos-overload",
        None,
        (Some(16.0), &[CI_BACKLOG]),
    )
    .await;
    let c = &r.check;
    assert!(r.skipped.is_empty(), "faults not injected: {:?}", r.skipped);
    assert!(
        c.overloaded > 0,
        "12,000 publishes/s offered against a 256 KiB backlog never made a leader refuse ({} acknowledged)",
        c.acknowledged
    );
    assert!(
        c.acknowledged > 1000 && c.delivered >= c.acknowledged,
        "the workload ran: {} acknowledged, {} delivered",
        c.acknowledged,
        c.delivered
    );
    assert!(c.valid, "anomalies: {:?}", c.examples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_takes_publishes_out_of_their_send_order_is_caught() {
    let r = chaos(
        "overload",
        "chaos-unchained",
        Some("unchained-publishes"),
        (Some(12.0), &[CI_BACKLOG]),
    )
    .await;
    let c = &r.check;
    assert!(
        !c.valid && c.send_order_violations > 0,
        "the checker missed a build that does not keep a connection's publishes in order \
         ({} refused, {} send order violations)",
        c.overloaded,
        c.send_order_violations
    );
}
