//! The machinery behind the settings table (`settings.rs`): the `settings_table!`
//! macro, and the small traits that turn a row's type and options into its default
//! and its `check-config` line.
//!
//! One row declares a setting once; the macro yields from it
//! - the `Settings` field (with the row's doc comment),
//! - the field of the private `Raw` struct envy deserializes (every setting optional
//!   there, so a default can depend on APP_ENV, which is itself a setting),
//! - its default, the same in every environment or one per environment,
//! - its `check-config` line in [`Settings::effective`](super::Settings::effective),
//!   in table order, masked when the row says `secret`,
//! - its entry in [`SETTINGS`](super::SETTINGS) (variable name, doc, secret or not).

use secrecy::{ExposeSecret, SecretString};

use super::{mask_url, Environment};

/// A row's default: the same in every environment (any value of the field's type
/// converts into it), or one per environment with [`by_env`].
pub enum EnvDefault<T> {
    Same(T),
    PerEnv {
        development: T,
        staging: T,
        production: T,
    },
}

/// A default that differs by environment: `= by_env(true, false, false)` reads
/// development, staging, production.
pub fn by_env<T>(development: T, staging: T, production: T) -> EnvDefault<T> {
    EnvDefault::PerEnv {
        development,
        staging,
        production,
    }
}

impl<T> EnvDefault<T> {
    pub fn pick(self, env: Environment) -> T {
        match self {
            Self::Same(v) => v,
            Self::PerEnv {
                development,
                staging,
                production,
            } => match env {
                Environment::Development => development,
                Environment::Staging => staging,
                Environment::Production => production,
            },
        }
    }
}

impl<T> From<T> for EnvDefault<T> {
    fn from(v: T) -> Self {
        Self::Same(v)
    }
}

/// So a string setting's row can say `= "0.0.0.0"`.
impl From<&str> for EnvDefault<String> {
    fn from(v: &str) -> Self {
        Self::Same(v.to_string())
    }
}

/// What a setting with neither a value nor a default becomes: `None` for an
/// optional one; a required one (a type listed here) is reported missing.
pub trait WhenUnset: Sized {
    fn when_unset(field: &'static str) -> Result<Self, envy::Error>;
}

impl<T> WhenUnset for Option<T> {
    fn when_unset(_: &'static str) -> Result<Self, envy::Error> {
        Ok(None)
    }
}

impl WhenUnset for SecretString {
    fn when_unset(field: &'static str) -> Result<Self, envy::Error> {
        Err(envy::Error::MissingValue(field))
    }
}

impl WhenUnset for String {
    fn when_unset(field: &'static str) -> Result<Self, envy::Error> {
        Err(envy::Error::MissingValue(field))
    }
}

/// How a non-secret value reads in `check-config`. `SecretString` has no impl on
/// purpose: a secret row that forgets `secret` does not compile.
pub trait Show {
    fn show(&self) -> String;
}

macro_rules! show_by_display {
    ($($t:ty),*) => {
        $(impl Show for $t {
            fn show(&self) -> String {
                self.to_string()
            }
        })*
    };
}
show_by_display!(
    String,
    bool,
    u16,
    u32,
    u64,
    usize,
    crate::domain::network::IpNetworks
);

/// Unset shows as an empty value.
impl<T: Show> Show for Option<T> {
    fn show(&self) -> String {
        self.as_ref().map(Show::show).unwrap_or_default()
    }
}

/// How a secret reads in `check-config`: `***` when set (`secret`), or the URL with
/// its password masked (`secret(url)`).
pub trait Secret {
    fn masked(&self) -> String;
    fn masked_url(&self) -> String;
}

impl Secret for SecretString {
    fn masked(&self) -> String {
        "***".into()
    }
    fn masked_url(&self) -> String {
        mask_url(self.expose_secret())
    }
}

/// Unset shows as an empty value.
impl Secret for Option<SecretString> {
    fn masked(&self) -> String {
        self.as_ref().map(Secret::masked).unwrap_or_default()
    }
    fn masked_url(&self) -> String {
        self.as_ref().map(Secret::masked_url).unwrap_or_default()
    }
}

/// One setting as the table declares it, for whatever must walk every setting
/// (tests that no secret is ever printed, documentation).
#[derive(Debug)]
pub struct Setting {
    /// The variable: the field name upper-cased (envy's mapping).
    pub name: &'static str,
    /// The row's doc comment, one entry per line.
    pub doc: &'static [&'static str],
    /// Masked in `check-config` and `Debug`.
    pub secret: bool,
    /// Has a `check-config` line (every setting but a `hidden` one).
    pub shown: bool,
    /// An empty value is a value, not "unset" (`keep_empty`).
    pub keep_empty: bool,
}

/// `user_service_port` → `USER_SERVICE_PORT`, at compile time.
pub const fn upper<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = b[i].to_ascii_uppercase();
        i += 1;
    }
    out
}

/// Whether a row's options include `option`, at compile time.
pub const fn has(options: &[&str], option: &str) -> bool {
    let mut i = 0;
    while i < options.len() {
        let (a, b) = (options[i].as_bytes(), option.as_bytes());
        let mut same = a.len() == b.len();
        let mut j = 0;
        while same && j < a.len() {
            same = a[j] == b[j];
            j += 1;
        }
        if same {
            return true;
        }
        i += 1;
    }
    false
}

/// The table: `settings.rs` holds its one invocation, whose grammar is
///
/// ```text
/// /// Doc comment: at least one line, required.
/// field_name: Type [= default] [, option]* ;
/// ```
///
/// - no default: `Option<T>` is unset (`None`); any other type is required
///   (`FIELD_NAME is required`);
/// - `= value` is the default everywhere; `= by_env(dev, staging, production)`
///   one per environment;
/// - options: `secret` (shown as `***`), `secret(url)` (a URL shown with its
///   password masked), `shown(|s| …)` (a `fn(&Settings) -> String` for a value
///   shown otherwise than by its type), `hidden` (no `check-config` line),
///   `keep_empty` (an empty value counts, rather than meaning unset).
///
/// After the rows, `internal { … }` lists fields that are not settings (filled by
/// loading, starting from `Default`).
macro_rules! settings_table {
    (
        $(#[$meta:meta])*
        pub struct $Settings:ident {
            $(
                $(#[doc = $doc:literal])+
                $field:ident : $ty:ty $(= $default:expr)? $(, $opt:ident $(($($arg:tt)*))?)* ;
            )*
        }
        internal {
            $( $(#[doc = $idoc:literal])* $ifield:ident : $ity:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone)]
        pub struct $Settings {
            $( $(#[doc = $doc])+ pub $field: $ty, )*
            $( $(#[doc = $idoc])* pub $ifield: $ity, )*
        }

        /// The variable names, one constant per field.
        #[allow(non_upper_case_globals)]
        mod names {
            $(
                pub const $field: &str = {
                    const BYTES: [u8; stringify!($field).len()] =
                        $crate::config::table::upper(stringify!($field));
                    match ::core::str::from_utf8(&BYTES) {
                        Ok(name) => name,
                        Err(_) => panic!("field names are ASCII"),
                    }
                };
            )*
        }

        /// What envy reads. Every setting is optional here so that a default may
        /// depend on APP_ENV: [`Raw::resolve`] fills them in.
        #[derive(serde::Deserialize)]
        struct Raw {
            $( $field: Option<$ty>, )*
        }

        /// The defaults, one function per field, given the environment.
        #[allow(dead_code)]
        mod defaults {
            use super::*;
            $(
                $(
                    pub fn $field(env: Environment) -> $ty {
                        $crate::config::table::EnvDefault::<$ty>::from($default).pick(env)
                    }
                )?
            )*
        }

        impl Raw {
            /// Defaults for what is unset; `MissingValue` (as serde would have
            /// said) for the first required setting, in table order, that is unset.
            fn resolve(self) -> Result<$Settings, envy::Error> {
                // APP_ENV picks the column of per-environment defaults; its own
                // default is the same everywhere.
                let env = match self.app_env {
                    Some(env) => env,
                    None => defaults::app_env(Environment::Development),
                };
                Ok($Settings {
                    $( $field: match self.$field {
                        Some(value) => value,
                        None => settings_table!(@unset env, $field, $ty $(, $default)?),
                    }, )*
                    $( $ifield: Default::default(), )*
                })
            }
        }

        /// Every setting the table declares, in table order.
        pub const SETTINGS: &[$crate::config::table::Setting] = &[
            $(
                $crate::config::table::Setting {
                    name: names::$field,
                    doc: &[$($doc),+],
                    secret: $crate::config::table::has(&[$(stringify!($opt)),*], "secret"),
                    shown: !$crate::config::table::has(&[$(stringify!($opt)),*], "hidden"),
                    keep_empty: $crate::config::table::has(&[$(stringify!($opt)),*], "keep_empty"),
                },
            )*
        ];

        impl $Settings {
            /// The effective settings as `KEY=value` pairs in table order, every
            /// secret masked as `***`: the lines `check-config` prints.
            pub fn effective(&self) -> Vec<(&'static str, String)> {
                let mut rows = Vec::with_capacity(SETTINGS.len());
                $(
                    settings_table!(@show rows, self, $field, (show), $($opt $(($($arg)*))?)*);
                )*
                rows
            }
        }
    };

    (@unset $env:ident, $field:ident, $ty:ty, $default:expr) => {
        defaults::$field($env)
    };
    (@unset $env:ident, $field:ident, $ty:ty) => {
        <$ty as $crate::config::table::WhenUnset>::when_unset(stringify!($field))?
    };

    // Options are read left to right; the last way of showing wins.
    (@show $rows:ident, $s:ident, $field:ident, ($($how:tt)*), keep_empty $($rest:tt)*) => {
        settings_table!(@show $rows, $s, $field, ($($how)*), $($rest)*)
    };
    (@show $rows:ident, $s:ident, $field:ident, ($($how:tt)*), secret(url) $($rest:tt)*) => {
        settings_table!(@show $rows, $s, $field, (secret_url), $($rest)*)
    };
    (@show $rows:ident, $s:ident, $field:ident, ($($how:tt)*), secret $($rest:tt)*) => {
        settings_table!(@show $rows, $s, $field, (secret), $($rest)*)
    };
    (@show $rows:ident, $s:ident, $field:ident, ($($how:tt)*), hidden $($rest:tt)*) => {
        settings_table!(@show $rows, $s, $field, (hidden), $($rest)*)
    };
    (@show $rows:ident, $s:ident, $field:ident, ($($how:tt)*), shown($f:expr) $($rest:tt)*) => {
        settings_table!(@show $rows, $s, $field, (shown $f), $($rest)*)
    };
    (@show $rows:ident, $s:ident, $field:ident, (show),) => {
        $rows.push((names::$field, $crate::config::table::Show::show(&$s.$field)))
    };
    (@show $rows:ident, $s:ident, $field:ident, (secret),) => {
        $rows.push((names::$field, $crate::config::table::Secret::masked(&$s.$field)))
    };
    (@show $rows:ident, $s:ident, $field:ident, (secret_url),) => {
        $rows.push((names::$field, $crate::config::table::Secret::masked_url(&$s.$field)))
    };
    (@show $rows:ident, $s:ident, $field:ident, (shown $f:expr),) => {{
        let shown: fn(&Settings) -> String = $f;
        $rows.push((names::$field, shown($s)))
    }};
    (@show $rows:ident, $s:ident, $field:ident, (hidden),) => {};
}

pub(crate) use settings_table;
