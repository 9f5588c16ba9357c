//! The service-client RPCs of users and sessions check their scope once, in the
//! service: a token without it is PERMISSION_DENIED, and the call does nothing.

use tonic::Code;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{GetUserRequest, VerifyTokenRequest};

use crate::helpers::TestApp;

#[tokio::test]
async fn verify_token_and_get_user_need_their_own_scope() {
    let app = TestApp::spawn().await;
    let (user_id, _, access) = app.user_with_token().await;
    let reader = app.service_token(&["users:read"]).await;
    let verifier = app.service_token(&["auth:verify"]).await;

    // users:read does not verify tokens; auth:verify does.
    let err = AuthServiceClient::new(app.grpc_with_token(&reader).await)
        .verify_token(VerifyTokenRequest {
            token: access.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "scope auth:verify required");
    let ok = AuthServiceClient::new(app.grpc_with_token(&verifier).await)
        .verify_token(VerifyTokenRequest { token: access })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.valid);

    // auth:verify does not read users; users:read does.
    let req = || GetUserRequest {
        user_id: user_id.to_string(),
    };
    let err = UserServiceClient::new(app.grpc_with_token(&verifier).await)
        .get_user(req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "scope users:read required");
    let user = UserServiceClient::new(app.grpc_with_token(&reader).await)
        .get_user(req())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.id, user_id.to_string());
}
