#![no_main]
//! The command line: `-o` option strings (virtiofsd's legacy syntax) and whole argument lists.

use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut args = vec![
        "berth".to_owned(),
        "--socket-path".to_owned(),
        "/nonexistent/fuzz.sock".to_owned(),
        "--shared-dir".to_owned(),
        "/nonexistent".to_owned(),
    ];
    if selector % 2 == 0 {
        // One `-o` value, as a VMM passes legacy options.
        args.push("-o".to_owned());
        args.push(text.into_owned());
    } else {
        // NUL-separated extra arguments.
        args.extend(text.split('\0').map(str::to_owned));
    }
    if let Ok(cli) = berth_fuzz::cli::Cli::try_parse_from(&args) {
        let _ = cli.resolve();
    }
});
