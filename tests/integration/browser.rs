//! The site in a real browser: headless Chromium (Debian's `chromium`) driven by
//! `tests/browser/*.test.mjs` through playwright-core. This test runs the app and the
//! push-service stand-in and hands them to the browser tests in the environment.
//!
//! Needs `chromium` (or `CHROMIUM=/path`), Node.js and `npm ci` in `tests/browser`
//! (`./dev test` and `.ci/run` do that). Screenshots land in `target/browser-artifacts/`.

use std::path::PathBuf;
use std::time::Duration;

use tidings_tests::harness::{TEST_PASSWORD, spawn_app};

fn chromium() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("no Chromium found: install Debian's `chromium` package (or set CHROMIUM=/path/to/chrome)");
}

#[tokio::test]
async fn the_site_works_in_a_real_browser() {
    let browser_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "run `npm ci` in tests/browser first (./dev test does it)"
    );
    let chromium = chromium();
    let app = spawn_app().await;
    app.create_admin_with_email("ada@tidings.test").await;
    let subscription = app.push.new_subscription();
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser-artifacts");

    let run = tokio::process::Command::new("node")
        .arg("--test")
        .arg("--test-reporter=spec")
        .arg("admin_and_visitor.test.mjs")
        .current_dir(&browser_dir)
        .env("APP_URL", &app.address)
        .env("PUSH_URL", app.push.origin())
        .env("SUBSCRIPTION", subscription.to_json().to_string())
        .env("ADMIN_EMAIL", "ada@tidings.test")
        .env("ADMIN_PASSWORD", TEST_PASSWORD)
        .env("CHROMIUM", chromium)
        .env("ARTIFACTS", &artifacts)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser tests finish within 3 minutes")
        .expect("node runs (is Node.js installed?)");

    let report = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{report}");
    assert!(output.status.success(), "the browser tests failed:\n{report}");
}
