//! Spool tests on a temp directory: append, ack and compaction, reload, integrity failures that
//! name the file, no plaintext on disk, the bound, key rotation and re-sealing.

use super::journal::{StepJournal, StepState, TaskJournal};
use super::*;
use bytes::Bytes;
use delegate_protocol::{BlobRef, Op, Secrets, TaskSpec};
use std::collections::BTreeMap;

const MARKER: &str = "MARKER-plaintext-7f3a9c";

fn ring() -> KeyRing {
    KeyRing::from_key("k1", &[3u8; 32]).unwrap()
}

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: dir.join("spool"),
        max_bytes: 1 << 20,
        segment_bytes: 2048,
    }
}

fn open(dir: &Path) -> (Spool, Vec<LoadedTask>) {
    Spool::open(settings(dir), ring()).unwrap()
}

fn frame(seq: u64) -> RecordBody {
    RecordBody::Frame {
        seq,
        frame: WireFrame::Binary(Bytes::from(format!("{MARKER} line {seq}\n").repeat(4))),
        done: false,
    }
}

fn done(seq: u64) -> RecordBody {
    RecordBody::Frame {
        seq,
        frame: WireFrame::Text(format!("{{\"type\":\"done\",\"seq\":{seq}}}")),
        done: true,
    }
}

fn spec(id: Uuid) -> TaskSpec {
    TaskSpec {
        task_id: id,
        op: Op::Plan,
        workspace: "w".into(),
        auto_approve: false,
        vars: BTreeMap::new(),
        var_files: vec![],
        env: BTreeMap::new(),
        secrets: Secrets(BTreeMap::from([("TOKEN".into(), MARKER.into())])),
        archive: BlobRef {
            size: 1,
            sha256: "0".repeat(64),
        },
        plan: None,
        timeout_secs: 0,
        egress: vec![],
    }
}

fn journal_record(id: Uuid, after_seq: u64, step: StepState) -> RecordBody {
    let mut j = TaskJournal::new(&spec(id), false, 1);
    j.exec = Some(super::journal::ExecJournal {
        image: "i".into(),
        binary: "tofu".into(),
        network: "n".into(),
        gateway: "10.0.0.1".into(),
        subnet: None,
        bridge: String::new(),
        volume: "v".into(),
        cache_volume: None,
        timeout_secs: 60,
        backend: None,
        steps: vec![StepJournal {
            name: "plan".into(),
            state: step,
        }],
        summary: Default::default(),
        plan_exit: None,
    });
    RecordBody::Journal {
        after_seq,
        json: j.to_json(),
    }
}

fn seqs(t: &LoadedTask) -> Vec<u64> {
    t.frames.iter().map(|(s, _)| *s).collect()
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.extend(fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn append_reload_keeps_order_and_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::from_u128(1);
    {
        let (spool, loaded) = open(tmp.path());
        assert!(loaded.is_empty());
        let mut t = spool.task(id);
        t.append(&[journal_record(id, 0, StepState::Started)], false)
            .unwrap();
        for seq in 1..=20 {
            t.append(&[frame(seq)], false).unwrap();
        }
        t.append(&[journal_record(id, 20, StepState::Done)], false)
            .unwrap();
        assert!(t.segment_paths().len() > 1, "small segments roll");
        assert_eq!(spool.usage(), t.bytes());
    }
    let (spool, loaded) = open(tmp.path());
    assert_eq!(loaded.len(), 1);
    let t = &loaded[0];
    assert_eq!(t.task, id);
    assert!(t.broken.is_none());
    assert_eq!(seqs(t), (1..=20).collect::<Vec<_>>());
    assert_eq!(t.acked, 0);
    assert_eq!(t.done_seq, None);
    let j = t.journal.as_ref().unwrap();
    assert_eq!(
        j.exec.as_ref().unwrap().steps[0].state,
        StepState::Done,
        "the latest journal wins"
    );
    assert_eq!(spool.usage(), t.spool.bytes());
}

#[test]
fn acks_delete_whole_segments_and_reload_resumes_after_them() {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::from_u128(2);
    let (spool, _) = open(tmp.path());
    let mut t = spool.task(id);
    t.append(&[journal_record(id, 0, StepState::Started)], false)
        .unwrap();
    for seq in 1..=30 {
        t.append(&[frame(seq)], false).unwrap();
    }
    let before = t.segment_paths();
    assert!(before.len() >= 3);
    let before_bytes = spool.usage();
    t.ack(25, false).unwrap();
    let after = t.segment_paths();
    assert!(after.len() < before.len());
    assert!(spool.usage() < before_bytes);
    for p in before.iter().filter(|p| !after.contains(p)) {
        assert!(!p.exists(), "{} deleted", p.display());
    }
    // An old ack changes nothing.
    t.ack(3, false).unwrap();
    assert_eq!(t.segment_paths(), after);
    drop(t);
    drop(spool);

    let (_spool, loaded) = open(tmp.path());
    let t = &loaded[0];
    assert!(t.acked <= 25);
    assert_eq!(*seqs(t).last().unwrap(), 30);
    assert_eq!(seqs(t).first().copied(), Some(t.acked + 1));
    assert!(t.journal.is_some(), "every segment starts with the journal");
}

#[test]
fn fully_acked_active_segment_is_replaced_and_numbering_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::from_u128(3);
    let (spool, _) = open(tmp.path());
    let mut t = spool.task(id);
    t.append(&[frame(1), frame(2)], false).unwrap();
    // Small and not under pressure: kept.
    t.ack(2, false).unwrap();
    assert_eq!(t.segment_paths().len(), 1);
    // Under pressure: replaced by an empty segment named after the next seq.
    t.ack(2, true).unwrap();
    let paths = t.segment_paths();
    assert_eq!(paths.len(), 1);
    assert!(paths[0].ends_with(format!("{:020}.seg", 3)), "{paths:?}");
    assert_eq!(spool.usage(), 0);
    assert!(!spool.is_full(), "an empty spool is never full");
    drop(t);
    drop(spool);
    let (spool, loaded) = open(tmp.path());
    let mut t = loaded.into_iter().next().unwrap();
    assert_eq!(t.acked, 2);
    assert!(t.frames.is_empty());
    assert_eq!(t.spool.last_seq(), 2);
    t.spool.append(&[frame(3), done(4)], false).unwrap();
    drop(t);
    drop(spool);
    let (_s, loaded) = open(tmp.path());
    assert_eq!(seqs(&loaded[0]), vec![3, 4]);
    assert_eq!(loaded[0].done_seq, Some(4));
}

#[test]
fn out_of_order_appends_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path());
    let mut t = spool.task(Uuid::from_u128(4));
    t.append(&[frame(1)], false).unwrap();
    let bytes = spool.usage();
    assert!(matches!(
        t.append(&[frame(3)], false),
        Err(SpoolError::OutOfOrder {
            seq: 3,
            last: 1,
            ..
        })
    ));
    assert!(matches!(
        t.append(&[frame(2), frame(2)], false),
        Err(SpoolError::OutOfOrder { .. })
    ));
    assert_eq!(spool.usage(), bytes);
    t.append(&[frame(2)], false).unwrap();
}

#[test]
fn remove_deletes_the_task_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path());
    let id = Uuid::from_u128(5);
    let mut t = spool.task(id);
    t.append(&[frame(1), done(2)], false).unwrap();
    let dir = tmp.path().join("spool").join(id.to_string());
    assert!(dir.exists());
    t.remove().unwrap();
    assert!(!dir.exists());
    assert_eq!(spool.usage(), 0);
}

#[test]
fn no_plaintext_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path());
    let id = Uuid::from_u128(6);
    let mut t = spool.task(id);
    t.append(&[journal_record(id, 0, StepState::Started)], false)
        .unwrap();
    for seq in 1..=10 {
        t.append(&[frame(seq)], false).unwrap();
    }
    t.append(&[done(11)], true).unwrap();
    let bytes = all_bytes(tmp.path());
    assert!(bytes.len() > 1000);
    assert!(
        !contains(&bytes, MARKER.as_bytes()),
        "marker found in the clear"
    );
    assert!(!contains(&bytes, b"line 3"));
    assert!(!contains(&bytes, b"\"type\":\"done\""));
    assert!(!contains(&bytes, b"TOKEN"), "not even the secret's name");
}

#[test]
fn flipped_byte_breaks_only_that_task_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (Uuid::from_u128(7), Uuid::from_u128(8));
    let victim;
    {
        let (spool, _) = open(tmp.path());
        let mut ta = spool.task(a);
        let mut tb = spool.task(b);
        for seq in 1..=5 {
            ta.append(&[frame(seq)], false).unwrap();
            tb.append(&[frame(seq)], false).unwrap();
        }
        victim = ta.segment_paths()[0].clone();
    }
    let mut bytes = fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&victim, &bytes).unwrap();

    let (_spool, loaded) = open(tmp.path());
    let ta = loaded.iter().find(|t| t.task == a).unwrap();
    let tb = loaded.iter().find(|t| t.task == b).unwrap();
    let why = ta.broken.as_deref().expect("task a is broken");
    assert!(why.contains(&victim.display().to_string()), "{why}");
    assert!(why.contains("integrity"), "{why}");
    assert!(ta.frames.is_empty());
    assert!(tb.broken.is_none());
    assert_eq!(seqs(tb), vec![1, 2, 3, 4, 5]);
    // The damaged files are kept aside, not read again.
    assert!(!tmp.path().join("spool").join(a.to_string()).exists());
    assert!(tmp.path().join("spool").join(QUARANTINE_DIR).exists());
    drop(loaded);
    drop(_spool);
    let (_spool, again) = open(tmp.path());
    assert_eq!(again.len(), 1, "quarantined task not loaded again");
}

#[test]
fn truncation_is_an_integrity_error_naming_the_file() {
    for cut in [1usize, 5, 17, 60] {
        let tmp = tempfile::tempdir().unwrap();
        let id = Uuid::from_u128(9);
        let path;
        {
            let (spool, _) = open(tmp.path());
            let mut t = spool.task(id);
            t.append(&[frame(1), frame(2)], false).unwrap();
            path = t.segment_paths()[0].clone();
        }
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
        let (_s, loaded) = open(tmp.path());
        let why = loaded[0].broken.as_deref().expect("broken");
        assert!(why.contains(&path.display().to_string()), "{why}");
        assert!(why.contains("truncated"), "cut {cut}: {why}");
    }
}

#[test]
fn missing_segment_swapped_records_and_foreign_records_are_caught() {
    // A middle segment deleted.
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::from_u128(10);
    {
        let (spool, _) = open(tmp.path());
        let mut t = spool.task(id);
        for seq in 1..=30 {
            t.append(&[frame(seq)], false).unwrap();
        }
        let paths = t.segment_paths();
        assert!(paths.len() >= 3);
        fs::remove_file(&paths[1]).unwrap();
    }
    let (_s, loaded) = open(tmp.path());
    let why = loaded[0].broken.as_deref().unwrap();
    assert!(why.contains("records are missing"), "{why}");

    // Two records swapped inside a segment.
    let tmp = tempfile::tempdir().unwrap();
    let path;
    {
        let (spool, _) = open(tmp.path());
        let mut t = spool.task(id);
        t.append(&[frame(1), frame(2)], false).unwrap();
        path = t.segment_paths()[0].clone();
    }
    let bytes = fs::read(&path).unwrap();
    let parts: Vec<(usize, &[u8])> = record::split_records(&bytes)
        .collect::<Result<_, _>>()
        .unwrap();
    let second = parts[1].0;
    let mut swapped = bytes[second..].to_vec();
    swapped.extend_from_slice(&bytes[..second]);
    fs::write(&path, swapped).unwrap();
    let (_s, loaded) = open(tmp.path());
    let why = loaded[0].broken.as_deref().unwrap();
    assert!(why.contains("seq 2, expected 1"), "{why}");

    // A segment of task A copied into task B's directory.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (Uuid::from_u128(11), Uuid::from_u128(12));
    {
        let (spool, _) = open(tmp.path());
        let mut ta = spool.task(a);
        ta.append(&[frame(1)], false).unwrap();
        let mut tb = spool.task(b);
        tb.append(&[frame(1)], false).unwrap();
        fs::copy(&ta.segment_paths()[0], &tb.segment_paths()[0]).unwrap();
    }
    let (_s, loaded) = open(tmp.path());
    let tb = loaded.iter().find(|t| t.task == b).unwrap();
    assert!(tb.broken.as_deref().unwrap().contains("belongs to task"));
    let ta = loaded.iter().find(|t| t.task == a).unwrap();
    assert!(ta.broken.is_none());
}

#[test]
fn garbage_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::from_u128(13);
    let dir = tmp.path().join("spool").join(id.to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(segment_name(1)), b"\x00\x00\x00\x05hello").unwrap();
    let (_s, loaded) = open(tmp.path());
    assert!(loaded[0].broken.is_some());
    drop((_s, loaded));
    // A stray file in a task directory.
    let id = Uuid::from_u128(14);
    let dir = tmp.path().join("spool").join(id.to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), b"hi").unwrap();
    let (_s, loaded) = open(tmp.path());
    assert!(loaded
        .iter()
        .find(|t| t.task == id)
        .unwrap()
        .broken
        .as_deref()
        .unwrap()
        .contains("notes.txt"));
}

#[test]
fn wrong_key_is_an_integrity_error() {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::from_u128(15);
    {
        let (spool, _) = open(tmp.path());
        let mut t = spool.task(id);
        t.append(&[frame(1)], false).unwrap();
    }
    let other = KeyRing::from_key("k2", &[4u8; 32]).unwrap();
    let (_s, loaded) = Spool::open(settings(tmp.path()), other).unwrap();
    let why = loaded[0].broken.as_deref().unwrap();
    assert!(why.contains("unknown key id"), "{why}");
}

#[test]
fn the_bound_is_reported_and_freed_by_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(tmp.path());
    s.max_bytes = 3000;
    let (spool, _) = Spool::open(s, ring()).unwrap();
    let mut t = spool.task(Uuid::from_u128(16));
    let mut seq = 0;
    while !spool.is_full() {
        seq += 1;
        t.append(&[frame(seq)], false).unwrap();
    }
    assert!(spool.usage() >= 3000);
    t.ack(seq, true).unwrap();
    assert!(!spool.is_full());
    assert_eq!(spool.stats().max_bytes, 3000);
}

#[test]
fn a_second_opener_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_spool, _) = open(tmp.path());
    let err = Spool::open(settings(tmp.path()), ring()).unwrap_err();
    assert!(matches!(err, SpoolError::Locked(_)), "{err}");
    assert!(err.to_string().contains("is the agent running"));
}

#[test]
fn rotate_then_reseal_moves_every_record_to_the_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let id = Uuid::from_u128(17);
    let first = keys::load(data, None).unwrap();
    let old_id = first.current_id().to_string();
    let key_file = keys::key_dir(data).join(format!("{old_id}.key"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let sdir = |d: &Path| SpoolSettings {
        dir: keys::spool_dir(d),
        max_bytes: 1 << 20,
        segment_bytes: 2048,
    };
    {
        let (spool, _) = Spool::open(sdir(data), first).unwrap();
        let mut t = spool.task(id);
        for seq in 1..=12 {
            t.append(&[frame(seq)], false).unwrap();
        }
        // Reseal refuses while the spool is open.
        let ring = keys::load(data, None).unwrap();
        assert!(matches!(
            keys::reseal(data, &ring),
            Err(SpoolError::Locked(_))
        ));
    }
    let new_id = keys::rotate(data).unwrap();
    assert_ne!(new_id, old_id);
    let ring = keys::load(data, None).unwrap();
    assert_eq!(ring.current_id(), new_id);
    // Old records still open under the rotated ring.
    {
        let (_s, loaded) = Spool::open(sdir(data), keys::load(data, None).unwrap()).unwrap();
        assert_eq!(seqs(&loaded[0]).len(), 12);
    }
    let report = keys::reseal(data, &ring).unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(report.rewritten >= 1 && report.records >= 12, "{report:?}");
    assert_eq!(keys::reseal(data, &ring).unwrap().records, 0, "idempotent");
    // Only the new key is needed now.
    fs::remove_file(&key_file).unwrap();
    let only_new = keys::load(data, None).unwrap();
    let (_s, loaded) = Spool::open(sdir(data), only_new).unwrap();
    assert!(loaded[0].broken.is_none(), "{:?}", loaded[0].broken);
    assert_eq!(seqs(&loaded[0]), (1..=12).collect::<Vec<_>>());
    assert!(!contains(&all_bytes(data), MARKER.as_bytes()));
}

#[test]
fn reseal_reports_a_damaged_file_and_still_reseals_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let ring = keys::load(data, None).unwrap();
    let (a, b) = (Uuid::from_u128(18), Uuid::from_u128(19));
    let bad;
    {
        let (spool, _) = Spool::open(
            SpoolSettings::new(keys::spool_dir(data)),
            keys::load(data, None).unwrap(),
        )
        .unwrap();
        let mut ta = spool.task(a);
        ta.append(&[frame(1)], false).unwrap();
        let mut tb = spool.task(b);
        tb.append(&[frame(1)], false).unwrap();
        bad = ta.segment_paths()[0].clone();
    }
    drop(ring);
    let mut bytes = fs::read(&bad).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&bad, &bytes).unwrap();
    keys::rotate(data).unwrap();
    let ring = keys::load(data, None).unwrap();
    let report = keys::reseal(data, &ring).unwrap();
    assert_eq!(report.files, 2);
    assert_eq!(report.rewritten, 1);
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].contains(&bad.display().to_string()));
    assert_eq!(fs::read(&bad).unwrap(), bytes, "damaged file untouched");
}

#[test]
fn env_key_is_used_without_writing_a_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let env = format!("ops1:{}", "ab".repeat(32));
    let ring = keys::load(tmp.path(), Some(&env)).unwrap();
    assert_eq!(ring.current_id(), "ops1");
    assert!(!keys::key_dir(tmp.path()).exists());
    let err = keys::load(tmp.path(), Some("not-hex")).unwrap_err();
    assert!(!err.to_string().contains("not-hex"));
}

#[test]
fn max_bytes_setting_parses_sizes_and_refuses_tiny_bounds() {
    assert_eq!(max_bytes_setting(None), Ok(DEFAULT_MAX_BYTES));
    assert_eq!(
        max_bytes_setting(Some(&SizeSetting::Text("512m".into()))),
        Ok(512 << 20)
    );
    assert_eq!(
        max_bytes_setting(Some(&SizeSetting::Bytes(8 << 20))),
        Ok(8 << 20)
    );
    let e = max_bytes_setting(Some(&SizeSetting::Bytes(1000))).unwrap_err();
    assert!(e.contains("at least"), "{e}");
    assert!(max_bytes_setting(Some(&SizeSetting::Text("lots".into()))).is_err());
    let s = SpoolSettings::with_max(PathBuf::from("/x"), 8 << 20);
    assert_eq!(s.segment_bytes, 512 << 10);
    assert_eq!(
        SpoolSettings::new(PathBuf::from("/x")).segment_bytes,
        DEFAULT_SEGMENT_BYTES
    );
}

#[test]
fn segment_names_outside_the_seq_range_are_not_segments() {
    assert_eq!(parse_segment_name("00000000000000000001.seg"), Some(1));
    assert_eq!(parse_segment_name("00000000000000000000.seg"), None);
    assert_eq!(parse_segment_name("18446744073709551615.seg"), None);
    assert_eq!(parse_segment_name("1.seg"), None);
    assert_eq!(parse_segment_name("0000000000000000000x.seg"), None);
    // Such a file in a task directory is reported, never a panic.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp
        .path()
        .join("spool")
        .join(Uuid::from_u128(20).to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("00000000000000000000.seg"), b"").unwrap();
    let (_s, loaded) = open(tmp.path());
    assert!(loaded[0]
        .broken
        .as_deref()
        .unwrap()
        .contains("unexpected file"));
}

#[test]
fn check_segment_reads_what_append_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path());
    let id = Uuid::from_u128(21);
    let mut t = spool.task(id);
    t.append(&[journal_record(id, 0, StepState::Started)], false)
        .unwrap();
    t.append(&[frame(1), done(2)], false).unwrap();
    let path = t.segment_paths()[0].clone();
    let bytes = fs::read(&path).unwrap();
    let c = check_segment(&ring(), id, &path, 1, &bytes).unwrap();
    assert_eq!(c.frames.len(), 2);
    assert_eq!(c.done_seq, Some(2));
    assert!(c.journal.is_some());
    assert!(check_segment(&ring(), Uuid::from_u128(22), &path, 1, &bytes).is_err());
    assert!(check_segment(&ring(), id, &path, 5, &bytes).is_err());
}
