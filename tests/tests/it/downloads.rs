//! Downloads (`/v1/files/{id}/content`, `/v1/batches/{id}/output`) are attachments under a safe
//! name and are never sniffed; the paged results are never sniffed either.

use std::time::Duration;

use sluice_tests::*;

/// `GET {path}` as tenant A: (Content-Disposition, X-Content-Type-Options), asserting a 200.
async fn download_headers(app: &TestApp, path: &str) -> (Option<String>, Option<String>) {
    let resp = app
        .req(reqwest::Method::GET, path, KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    (
        header("content-disposition"),
        header("x-content-type-options"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_are_attachments_under_a_safe_name_and_never_sniffed() {
    let app = spawn_app().await;
    let nosniff = Some("nosniff".to_owned());

    // An uploaded file: its own name, with everything outside [A-Za-z0-9._-] replaced.
    let resp = app
        .upload_raw(
            KEY_A,
            "my \"report\"; <v2> données.jsonl",
            jsonl(&chat_lines(2)),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let file: serde_json::Value = resp.json().await.unwrap();
    let file_id = file["id"].as_str().unwrap();
    assert_eq!(
        download_headers(&app, &format!("/files/{file_id}/content")).await,
        (
            Some("attachment; filename=\"my__report____v2__donn_es.jsonl\"".to_owned()),
            nosniff.clone()
        )
    );

    // A batch's output file and its reshaped output.
    let id = app.create_batch(KEY_A, file_id).await;
    let batch = app.wait_terminal(KEY_A, &id, Duration::from_secs(30)).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    let output_id = batch["output_file_id"].as_str().unwrap();
    let output_file = app.get_json(KEY_A, &format!("/files/{output_id}")).await;
    let stored = output_file["filename"].as_str().unwrap();
    let (disposition, sniff) = download_headers(&app, &format!("/files/{output_id}/content")).await;
    let expected_name = if stored.is_empty() { output_id } else { stored };
    assert!(
        expected_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "{expected_name}"
    );
    assert_eq!(
        (disposition, sniff),
        (
            Some(format!("attachment; filename=\"{expected_name}\"")),
            nosniff.clone()
        )
    );
    assert_eq!(
        download_headers(&app, &format!("/batches/{id}/output")).await,
        (
            Some(format!("attachment; filename=\"{id}_output.jsonl\"")),
            nosniff.clone()
        )
    );
    let (disposition, sniff) = download_headers(&app, &format!("/batches/{id}/results")).await;
    assert_eq!((disposition, sniff), (None, nosniff));
}
