//! AuthService adapter.

use crate::app::AppState;
use crate::proto::auth_service_server::AuthService;

pub struct AuthApi {
    #[allow(dead_code)]
    state: AppState,
}

impl AuthApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {}
