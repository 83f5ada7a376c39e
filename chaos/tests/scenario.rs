//! Scenario files: the shipped ones parse and validate, a seed fixes the schedule, bad files
//! get errors that say what to fix.

use rand::rngs::StdRng;
use rand::SeedableRng;
use warbler_chaos::scenario::{Action, Scenario, Target};

fn shipped() -> Vec<(String, Scenario)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
            out.push((path.display().to_string(), s));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_shipped_scenario_loads_and_plans_faults() {
    let all = shipped();
    assert!(all.len() >= 8, "{} scenarios", all.len());
    for (path, s) in &all {
        let plan = s.plan(&mut StdRng::seed_from_u64(1));
        assert!(!plan.is_empty(), "{path} plans no fault");
        for p in &plan {
            assert!(
                p.at_s + p.hold_s <= s.duration_s,
                "{path}: a fault at {} s heals after the run",
                p.at_s
            );
        }
        assert!(plan.windows(2).all(|w| w[0].at_s <= w[1].at_s));
    }
    let actions: Vec<Action> = all
        .iter()
        .flat_map(|(_, s)| s.faults.iter().map(|f| f.action))
        .collect();
    for a in [
        Action::Kill,
        Action::Pause,
        Action::Isolate,
        Action::Partition,
        Action::Restart,
        Action::Add,
        Action::Decommission,
        Action::Scale,
        Action::ScaleRaw,
        Action::Backup,
    ] {
        assert!(actions.contains(&a), "no shipped scenario uses {a:?}");
    }
}

#[test]
fn a_seed_fixes_the_schedule() {
    let (_, s) = shipped()
        .into_iter()
        .find(|(_, s)| s.name == "kill-random")
        .unwrap();
    let times = |seed| -> Vec<(f64, u64)> {
        s.plan(&mut StdRng::seed_from_u64(seed))
            .iter()
            .map(|p| (p.at_s, p.pick))
            .collect()
    };
    assert_eq!(times(7), times(7));
    assert_ne!(times(7), times(8));
}

#[test]
fn bad_scenarios_are_refused_with_a_reason() {
    let parse = |text: &str| -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, text).unwrap();
        format!("{:#}", Scenario::load(&path).unwrap_err())
    };
    let e =
        parse("name='x'\nduration_s=10\n[[fault]]\naction='kill'\ntarget='leader'\nstart_s=1\n");
    assert!(e.contains("use random, hot-leader"), "{e}");
    let e = parse("name='x'\nduration_s=10\n[[fault]]\naction='melt'\ntarget='all'\nstart_s=1\n");
    assert!(e.contains("melt") && e.contains("docs/chaos.md"), "{e}");
    let e =
        parse("name='x'\nduration_s=10\n[[fault]]\naction='kill'\ntarget='node:5'\nstart_s=1\n");
    assert!(e.contains("nodes 0 to 2"), "{e}");
    let e =
        parse("name='x'\nduration_s=10\n[[fault]]\naction='partition'\ntarget='all'\nstart_s=1\n");
    assert!(e.contains("proper subset"), "{e}");
    let e = parse("name='x'\nduration_s=10\n[[fault]]\naction='add'\nstart_s=1\n");
    assert!(e.contains("cluster.spare_nodes"), "{e}");
    let e = parse(
        "name='x'\nduration_s=10\n[[fault]]\naction='decommission'\ntarget='each'\nstart_s=1\n",
    );
    assert!(e.contains("proper subset"), "{e}");
    let e = parse("name='x'\nduration_s=10\n[[fault]]\naction='backup'\nstart_s=1\nevery_s=2\n");
    assert!(e.contains("a backup fault runs once"), "{e}");
    let e = parse(
        "name='x'\nduration_s=10\n[[fault]]\naction='backup'\nstart_s=1\n[[fault]]\naction='backup'\nstart_s=3\n",
    );
    assert!(e.contains("one backup fault per scenario"), "{e}");
    assert_eq!(Target::parse("node:2"), Ok(Target::Node(2)));
}
