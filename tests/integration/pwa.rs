//! The installable, offline-tolerant site: manifest, site service worker, offline page.

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE};
use tidings_tests::harness::{Options, extract_attribute, new_client, spawn_app, spawn_app_with};

#[tokio::test]
async fn the_manifest_describes_an_installable_app_and_every_page_links_it() {
    let app = spawn_app().await;
    let client = new_client();

    let response = client.get(format!("{}/manifest.webmanifest", app.address)).send().await.expect("manifest");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_TYPE], "application/manifest+json");
    let manifest: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(manifest["display"], "standalone");
    assert_eq!(manifest["start_url"], "/feedback");
    assert!(manifest["theme_color"].is_string());
    let sizes: Vec<&str> =
        manifest["icons"].as_array().expect("icons").iter().filter_map(|i| i["sizes"].as_str()).collect();
    assert_eq!(sizes, ["192x192", "512x512"]);
    for icon in manifest["icons"].as_array().expect("icons") {
        let src = icon["src"].as_str().expect("src");
        let png = client.get(format!("{}{src}", app.address)).send().await.expect("icon");
        assert_eq!(png.status(), StatusCode::OK);
        assert_eq!(png.bytes().await.expect("bytes")[..8], *b"\x89PNG\r\n\x1a\n");
    }
    for path in ["/feedback", "/feedback/thanks", "/offline", "/admin/login"] {
        let html = client.get(format!("{}{path}", app.address)).send().await.expect("page").text().await.expect("html");
        assert!(html.contains("<link rel=\"manifest\" href=\"/manifest.webmanifest\">"), "{path}");
    }
}

#[tokio::test]
async fn the_site_service_worker_precaches_the_shell_and_carries_the_asset_version() {
    let app =
        spawn_app_with(Options { env: vec![("SW_CACHE_ENTRIES".into(), "7".into())], ..Options::default() }).await;
    let client = new_client();
    let html = client.get(format!("{}/feedback", app.address)).send().await.expect("form").text().await.expect("html");
    let css = extract_attribute(&html, "<link rel=\"stylesheet\" href=\"").expect("css link");

    let response = client.get(format!("{}/sw.js", app.address)).send().await.expect("sw");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[CACHE_CONTROL], "no-cache");
    let js = response.text().await.expect("js");
    assert!(js.starts_with("const VERSION = \""));
    assert!(js.contains("const MAX_ENTRIES = 7;"));
    let precache = js.lines().find(|l| l.starts_with("const PRECACHE = ")).expect("precache line");
    for url in ["\"/offline\"", "\"/feedback\"", &format!("\"{css}\"")] {
        assert!(precache.contains(url), "{url} in {precache}");
    }
    for needle in ["trimCache(DYNAMIC, MAX_ENTRIES)", "caches.delete(name)", "no-store", "feedback-outbox"] {
        assert!(js.contains(needle), "{needle}");
    }
}

#[tokio::test]
async fn pages_are_revalidated_and_the_offline_page_says_what_happened() {
    let app = spawn_app().await;
    let client = new_client();

    let offline = client.get(format!("{}/offline", app.address)).send().await.expect("offline");
    let form = client.get(format!("{}/feedback", app.address)).send().await.expect("form");

    assert_eq!(offline.status(), StatusCode::OK);
    assert_eq!(offline.headers()[CACHE_CONTROL], "no-cache");
    assert_eq!(form.headers()[CACHE_CONTROL], "no-cache");
    let html = offline.text().await.expect("html");
    assert!(html.contains("data-saved=\"false\""), "the worker flips this when it kept a form");
    assert!(html.contains("will be sent as soon as the connection returns"));
    assert!(form.text().await.expect("html").contains("data-outbox"));
}
