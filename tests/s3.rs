//! Repositories on S3, against a real radosgw (tests/common/rgw.rs starts one per process).

mod common;

#[test]
fn the_engine_serves_s3_with_object_lock_buckets() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let b = rgw.bucket("engine", false);
    let (code, body) = rgw.request_with("PUT", &format!("{b}/hello"), &[], b"world");
    assert_eq!(code, 200, "{body}");
    let (code, body) = rgw.request("GET", &format!("{b}/hello"), &[]);
    assert_eq!((code, body.as_str()), (200, "world"));
    // Object Lock needs versioning: a bucket made with it reports both.
    let locked = rgw.bucket("engine-locked", true);
    let (code, body) = rgw.request("GET", &format!("{locked}?object-lock="), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>"),
        "{body}"
    );
    let (code, body) = rgw.request("GET", &format!("{locked}?versioning="), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<Status>Enabled</Status>"), "{body}");
}
