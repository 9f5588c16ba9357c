//! AccountService adapter.

use crate::app::AppState;
use crate::proto::account_service_server::AccountService;

pub struct AccountApi {
    #[allow(dead_code)]
    state: AppState,
}

impl AccountApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AccountService for AccountApi {}
