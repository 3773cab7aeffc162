//! The filter logs through the `log` facade (`log::info!`, `log::error!`); each glue installs the logger of
//! its host: `proxy_log` for the `.wasm`, Envoy's dynamic-module logger for the native build. Both hosts
//! number levels the same way, from trace (0) to critical (5), so one [`HostLogger`] serves both. Nothing is
//! logged per request.

/// The `log` facade's logger for one host: each line, with the host's level number, to `write` (the glue's
/// call into its host).
pub struct HostLogger {
    pub write: fn(level: u32, message: &str),
}

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        (self.write)(host_level(record.level()), &message(record));
    }

    fn flush(&self) {}
}

/// Installs `logger` for this process or VM at level info; once (later calls change nothing).
pub fn install(logger: &'static HostLogger) {
    if log::set_logger(logger).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// The host's number for a `log` level.
pub fn host_level(level: log::Level) -> u32 {
    match level {
        log::Level::Trace => 0,
        log::Level::Debug => 1,
        log::Level::Info => 2,
        log::Level::Warn => 3,
        log::Level::Error => 4,
    }
}

/// A log line as one string (without formatting when it is a plain literal).
pub fn message(record: &log::Record) -> std::borrow::Cow<'static, str> {
    match record.args().as_str() {
        Some(text) => std::borrow::Cow::Borrowed(text),
        None => std::borrow::Cow::Owned(record.args().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_numbered_as_proxy_wasm_and_envoy_s_dynamic_modules_number_them() {
        assert_eq!(host_level(log::Level::Info), 2);
        assert_eq!(host_level(log::Level::Warn), 3);
        assert_eq!(host_level(log::Level::Error), 4);
        let line = format_args!("config rejected: {}", 7).to_string();
        assert_eq!(line, "config rejected: 7");
        assert_eq!(
            message(&log::Record::builder().args(format_args!("plain")).build()),
            "plain"
        );
    }
}
