//! A conflict caused by one field names it (DESIGN §9):
//! `errors: [{field, code: "taken", message}]`, on the 409 `conflict` problem.

use serde_json::{json, Value};

use crate::helpers::{assert_problem, TestApp};

const PASSWORD: &str = "correct horse battery staple 9";

fn taken(body: &Value) -> Vec<(String, String)> {
    body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
                    (
                        e["field"].as_str().unwrap_or_default().to_string(),
                        e["code"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_conflict_on_one_field_names_it_as_taken() {
    let app = TestApp::spawn().await;
    let email = format!("taken-{}@example.com", uuid::Uuid::new_v4().simple());
    app.register(&email, PASSWORD).await;

    // The same email again, in another case: the email is taken.
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": email.to_uppercase(), "password": PASSWORD, "full_name": "Twice"}),
        )
        .await;
    let body = assert_problem(res, 409, "conflict").await;
    assert_eq!(taken(&body), [("email".into(), "taken".into())], "{body}");
    assert!(
        !body.to_string().contains(&email),
        "the value is not echoed: {body}"
    );

    // A second trading account for the same broker login.
    let token = app.login(&email, PASSWORD).await;
    let account = json!({"broker": "zerodha", "broker_user_id": "AB1234", "nickname": "main"});
    for expected in [201, 409] {
        let res = app
            .http
            .post(app.url("/v1/trading-accounts"))
            .bearer_auth(&token)
            .json(&account)
            .send()
            .await
            .unwrap();
        if expected == 201 {
            assert_eq!(res.status(), 201);
            continue;
        }
        let body = assert_problem(res, 409, "conflict").await;
        assert_eq!(
            taken(&body),
            [("broker_user_id".into(), "taken".into())],
            "{body}"
        );
    }
}
