//! UserService adapter.

use crate::app::AppState;
use crate::proto::user_service_server::UserService;

pub struct UserApi {
    #[allow(dead_code)]
    state: AppState,
}

impl UserApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {}
