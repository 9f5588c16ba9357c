//! Logging (pretty or one JSON object per line), the Prometheus recorder, Sentry.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::config::{LogFormat, Settings};

/// Maps the seed's level names (`DEBUG`, `INFO`, `WARNING`) onto tracing's.
pub fn filter_directive(level: &str) -> String {
    let base = match level.trim().to_ascii_lowercase().as_str() {
        "warning" | "warn" => "warn",
        "critical" | "fatal" | "error" => "error",
        "debug" => "debug",
        "trace" => "trace",
        _ => "info",
    };
    // Our crate at the chosen level; chatty dependencies one notch quieter.
    format!("{base},h2=warn,hyper=warn,tower=warn,sqlx=warn,fred=warn,rustls=warn")
}

/// Installs the global subscriber once; later calls (tests) are no-ops.
pub fn init_tracing(settings: &Settings) {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter = EnvFilter::try_from_env("RUST_LOG")
            .unwrap_or_else(|_| EnvFilter::new(filter_directive(&settings.log_level)));
        let fmt_layer = match settings.log_format {
            // A line logged while a request is served carries that request's span,
            // `"span":{"request_id":…,"name":"request"}` (http::observe).
            LogFormat::Json => fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .boxed(),
            LogFormat::Pretty | LogFormat::Plain => fmt::layer().with_target(false).boxed(),
        };
        let sentry_layer = settings
            .sentry_dsn
            .as_ref()
            .map(|_| sentry::integrations::tracing::layer());
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt_layer)
            .with(sentry_layer)
            .try_init();
    });
}

/// Starts Sentry when SENTRY_DSN is set; keep the guard alive for the process.
pub fn init_sentry(settings: &Settings) -> Option<sentry::ClientInitGuard> {
    use secrecy::ExposeSecret;
    let dsn = settings.sentry_dsn.as_ref()?;
    Some(sentry::init((
        dsn.expose_secret().to_string(),
        sentry::ClientOptions {
            release: Some(env!("CARGO_PKG_VERSION").into()),
            environment: Some(settings.app_env.as_str().into()),
            send_default_pii: false,
            ..Default::default()
        },
    )))
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist in tests; the handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            // Histogram samples pile up until drained: drain them between scrapes too,
            // so memory stays bounded when nobody scrapes.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            handle
        })
        .clone()
}
