//! A malformed id in a gRPC request answers INVALID_ARGUMENT on every RPC, a
//! well-formed unknown one NOT_FOUND (or valid=false on the Verify RPCs)
//! (DESIGN §9).

use tonic::Code;
use user_service::proto::account_service_client::AccountServiceClient;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{
    CheckAccountAccessRequest, GetBrokerCredentialsRequest, GetTradingAccountRequest,
    GetUserRequest, ListUserAccountsRequest, VerifyApiKeyRequest,
};

use crate::helpers::TestApp;

#[tokio::test]
async fn a_malformed_id_is_invalid_argument_on_every_rpc_and_an_unknown_one_not_found() {
    let app = TestApp::spawn().await;
    let token = app
        .service_token(&[
            "users:read",
            "accounts:read",
            "credentials:read",
            "auth:verify",
        ])
        .await;
    let channel = app.grpc_with_token(&token).await;
    let mut users = UserServiceClient::new(channel.clone());
    let mut accounts = AccountServiceClient::new(channel.clone());
    let mut auth = AuthServiceClient::new(channel);
    let unknown = uuid::Uuid::new_v4().to_string();

    for (raw, want) in [
        ("not-a-uuid", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        (unknown.as_str(), Code::NotFound),
    ] {
        let id = || raw.to_string();
        let codes = [
            (
                "GetUser",
                users
                    .get_user(GetUserRequest { user_id: id() })
                    .await
                    .map(|_| ()),
            ),
            (
                "ListUserAccounts",
                users
                    .list_user_accounts(ListUserAccountsRequest { user_id: id() })
                    .await
                    .map(|_| ()),
            ),
            (
                "GetTradingAccount",
                accounts
                    .get_trading_account(GetTradingAccountRequest { account_id: id() })
                    .await
                    .map(|_| ()),
            ),
            (
                "GetBrokerCredentials",
                accounts
                    .get_broker_credentials(GetBrokerCredentialsRequest { account_id: id() })
                    .await
                    .map(|_| ()),
            ),
        ];
        for (rpc, result) in codes {
            let err = result.expect_err(rpc);
            assert_eq!(err.code(), want, "{rpc}({raw:?}): {err:?}");
            if want == Code::InvalidArgument {
                // One conversion for every id field: the same answer, naming the field.
                let field = if rpc.contains("User") {
                    "user_id"
                } else {
                    "account_id"
                };
                assert_eq!(err.message(), format!("{field}: must be a UUID"), "{rpc}");
            }
        }
        if want == Code::InvalidArgument {
            let err = accounts
                .check_account_access(CheckAccountAccessRequest {
                    user_id: id(),
                    account_id: unknown.clone(),
                    permission: "read".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), want, "CheckAccountAccess({raw:?})");
            assert_eq!(err.message(), "user_id: must be a UUID");
            let err = auth
                .verify_api_key(VerifyApiKeyRequest {
                    api_key: "sbk_dev_nothing".into(),
                    trading_account_id: Some(id()).filter(|s| !s.is_empty()),
                    ..Default::default()
                })
                .await;
            if !raw.is_empty() {
                let err = err.unwrap_err();
                assert_eq!(
                    err.code(),
                    want,
                    "VerifyApiKey(trading_account_id: {raw:?})"
                );
                assert_eq!(err.message(), "trading_account_id: must be a UUID");
            }
        }
    }
}
