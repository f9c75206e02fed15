//! The shipped Prometheus and Alertmanager files are valid and their alert
//! rules behave as their unit tests say, checked by the real tools
//! (`promtool` from Debian's prometheus, `amtool` from
//! prometheus-alertmanager). A missing tool fails the test.

use std::path::Path;
use std::process::Command;

fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!("`{name}` is not installed: run `bash tests/run.sh`, which installs Debian's prometheus and prometheus-alertmanager");
}

fn run(bin: &str, args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let out = Command::new(bin)
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("run tool");
    assert!(
        out.status.success(),
        "{bin} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_the_scrape_config() {
    let promtool = tool("promtool");
    run(
        &promtool,
        &[
            "check",
            "rules",
            "prometheus/charter-alerts.yml",
            "prometheus/mapek-alerts.yml",
        ],
    );
    run(&promtool, &["check", "config", "prometheus/prometheus.yml"]);
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    let promtool = tool("promtool");
    run(
        &promtool,
        &[
            "test",
            "rules",
            "prometheus/tests/charter-alerts.test.yml",
            "prometheus/tests/mapek-alerts.test.yml",
        ],
    );
}

#[test]
fn amtool_accepts_the_alertmanager_config() {
    let amtool = tool("amtool");
    run(&amtool, &["check-config", "alertmanager/alertmanager.yml"]);
}
