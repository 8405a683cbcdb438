//! Secrets are encrypted at rest: a Secret's value is nowhere in etcd's data files, in any form
//! `scan::Needle` knows, while a ConfigMap's value written alongside is there in clear (so the
//! search does see what etcd wrote), and the Secret is stored under the encryption's prefix.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use stagely_testenv::scan::{Needle, unique_value};
use stagely_testenv::{ControlPlane, ENCRYPTED_PREFIX, ENCRYPTION_CONFIG, Options};

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_is_not_in_etcds_data_files_in_clear() {
    let plane = ControlPlane::start(Options::default()).await.expect("start");
    let config = plane.dir().join(ENCRYPTION_CONFIG);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600, "it holds the key");

    let client = plane.client().await.unwrap();
    let (secret_value, plain_value) = (unique_value("secret"), unique_value("plain"));
    let pp = PostParams::default();
    let secret = Secret {
        metadata: ObjectMeta { name: Some("at-rest".into()), ..Default::default() },
        string_data: Some(BTreeMap::from([("value".to_owned(), secret_value.clone())])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), "default").create(&pp, &secret).await.unwrap();
    let map = ConfigMap {
        metadata: ObjectMeta { name: Some("in-clear".into()), ..Default::default() },
        data: Some(BTreeMap::from([("value".to_owned(), plain_value.clone())])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), "default").create(&pp, &map).await.unwrap();
    // The apiserver still gives the value back in clear.
    let read = Api::<Secret>::namespaced(client, "default").get("at-rest").await.unwrap();
    assert_eq!(read.data.unwrap()["value"].0, secret_value.as_bytes());

    // etcd has written both objects (its WAL is written before it answers; readable at once).
    let etcd = plane.dir().join("etcd");
    let (control, files) = Needle::new(&plain_value).find_in_tree(&etcd, &[]).unwrap();
    assert!(files > 0, "no file under {}", etcd.display());
    assert!(control.iter().any(|hit| hit.form == "raw"), "the ConfigMap's value is not in {}", etcd.display());
    let (prefix, _) = Needle::new(ENCRYPTED_PREFIX).find_in_tree(&etcd, &[]).unwrap();
    assert!(prefix.iter().any(|hit| hit.form == "raw"), "no {ENCRYPTED_PREFIX} value in {}", etcd.display());

    let needle = Needle::new(&secret_value);
    let (hits, files) = needle.find_in_tree(&etcd, &[]).unwrap();
    println!("etcd_files_scanned={files} forms={:?}", needle.forms());
    assert!(hits.is_empty(), "the Secret's value is in etcd's data files: {hits:?}");
}
