//! `stagely.yaml` as a repository may hold it: parsing never panics, and an invalid file always
//! yields a field path to show the user.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|yaml: &str| {
    if let Err(err) = stagely_api::config::parse(yaml) {
        assert!(!err.errors.is_empty(), "an invalid stagely.yaml yields at least one field error");
        for field in &err.errors {
            assert!(!field.path.is_empty(), "an invalid stagely.yaml always yields a field path: {field:?}");
        }
    }
});
