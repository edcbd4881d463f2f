//! The identity baked into a worker binary by `lockstep_build::emit()`, read back with
//! [`build_info!`](crate::build_info).

/// What a binary knows about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildInfo {
    /// Full git SHA, or `unknown`.
    pub git_sha: &'static str,
    /// RFC 3339 build date, when baked.
    pub build_date: Option<&'static str>,
    /// Human version label, when baked.
    pub version: Option<&'static str>,
    /// Whether the binary was built without optimisations' release profile
    /// (`debug_assertions` on): a development build.
    pub debug_build: bool,
    /// The crate name.
    pub package: &'static str,
}

impl BuildInfo {
    /// The SHA, or `unknown`, as the guards compare it.
    pub fn sha(&self) -> &'static str {
        self.git_sha
    }
}

/// The calling crate's [`BuildInfo`]: expands in the caller, so it sees the caller's
/// build-script variables and profile.
#[macro_export]
macro_rules! build_info {
    () => {
        $crate::BuildInfo {
            git_sha: match option_env!("LOCKSTEP_GIT_SHA") {
                Some(s) => s,
                None => "unknown",
            },
            build_date: option_env!("LOCKSTEP_BUILD_DATE"),
            version: option_env!("LOCKSTEP_VERSION"),
            debug_build: cfg!(debug_assertions),
            package: env!("CARGO_PKG_NAME"),
        }
    };
}
