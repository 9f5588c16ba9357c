//! tonic adapters: convert → call service → convert. Health and reflection need no
//! token; every other method requires a service token with the method's scope.

pub mod account;
pub mod auth;
pub mod convert;
pub mod interceptor;
pub mod status;
pub mod user;

use std::collections::HashSet;
use std::sync::LazyLock;

use prost::Message as _;
use prost_types::FileDescriptorSet;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::proto::account_service_server::AccountServiceServer;
use crate::proto::auth_service_server::AuthServiceServer;
use crate::proto::user_service_server::UserServiceServer;
use crate::service::Services;

/// Fully-qualified names of our services, as health and reflection report them.
pub const SERVICE_NAMES: [&str; 3] = [
    "stocksblitz.user.v1.AuthService",
    "stocksblitz.user.v1.UserService",
    "stocksblitz.user.v1.AccountService",
];

/// Every RPC this server answers, as `/package.Service/Method`, read from the
/// descriptor sets of what `routes` serves. Metrics label only these: a path a
/// client made up must not become a new series.
static KNOWN_RPCS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .filter_map(|bytes| FileDescriptorSet::decode(bytes).ok())
    .flat_map(|set| set.file)
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |svc| {
            let prefix = match package.as_str() {
                "" => format!("/{}/", svc.name()),
                p => format!("/{p}.{}/", svc.name()),
            };
            svc.method
                .into_iter()
                .map(move |m| format!("{prefix}{}", m.name()))
        })
    })
    .collect()
});

/// The RPC's path when it is one this server serves.
pub fn known_rpc(path: &str) -> Option<&'static str> {
    KNOWN_RPCS.get(path).map(String::as_str)
}

/// gRPC health: the overall status ("") and one per service move together.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for name in SERVICE_NAMES {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Our three services plus health and reflection (v1 and v1alpha); each adapter
/// gets the services it calls, the interceptor the service-token verifier.
pub fn routes(services: &Services) -> anyhow::Result<(Routes, Health)> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let auth = interceptor::ServiceAuth(services.service_clients.clone());
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Every method of our services needs a service token; health and
        // reflection above need none.
        .add_service(AuthServiceServer::with_interceptor(
            auth::AuthApi::new(services.sessions.clone(), services.api_keys.clone()),
            auth.clone(),
        ))
        .add_service(UserServiceServer::with_interceptor(
            user::UserApi::new(
                services.users.clone(),
                services.accounts.clone(),
                services.policy.clone(),
            ),
            auth.clone(),
        ))
        .add_service(AccountServiceServer::with_interceptor(
            account::AccountApi::new(services.accounts.clone()),
            auth,
        ));
    Ok((routes, Health { reporter }))
}

#[cfg(test)]
mod tests {
    use super::known_rpc;

    #[test]
    fn known_rpcs_are_the_served_methods_only() {
        for path in [
            "/stocksblitz.user.v1.AuthService/VerifyApiKey",
            "/stocksblitz.user.v1.AccountService/CheckAccountAccess",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(known_rpc(path), Some(path));
        }
        for path in [
            "/stocksblitz.user.v1.AuthService/Nope",
            "/stocksblitz.user.v1.AuthService/",
            "/stocksblitz.x.Y/VerifyApiKey",
            "/grpc.health.v1.Health/Check/extra",
            "/v1/users/me",
        ] {
            assert_eq!(known_rpc(path), None, "{path}");
        }
    }
}
