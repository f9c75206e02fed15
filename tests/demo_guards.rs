//! `mapek demo --scenario guards` through the binary: the disruption budget,
//! a breaker and flapping at work on the in-process simulator (its own test
//! binary, so it runs alongside the other demo test).

mod support;

use serde_json::Value;

#[test]
fn the_guards_scenario_shows_the_budget_a_breaker_and_flapping() {
    let out = std::process::Command::new(support::bin())
        .args([
            "demo",
            "--scenario",
            "guards",
            "--duration",
            "150",
            "--report",
            "json",
        ])
        .output()
        .expect("run demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["scenario"], "guards");
    // Four node crashes, a budget of two restarts: exactly two restarts,
    // the other two held then escalated after the queue timeout.
    assert_eq!(r["restarts"], 2, "{r}\n{stderr}");
    assert_eq!(r["guard_decisions"]["disruption_budget/held"], 2, "{r}");
    assert_eq!(r["guard_decisions"]["queue_timeout/escalated"], 2, "{r}");
    assert!(
        r["breakers_opened"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "{r}"
    );
    assert_eq!(r["flapping"], serde_json::json!(["search"]), "{r}");
    // The narration tells it.
    for line in [
        "guard      disruption_budget held",
        "breaker    `",
        "flapping   component `search`",
    ] {
        assert!(
            stderr.contains(line),
            "no `{line}` in the narration:\n{stderr}"
        );
    }
}
