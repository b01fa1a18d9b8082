//! The rules of framed files on a small framing of their own: 12-byte headers (marker,
//! body length, body CRC32 over the kind too), bodies of text; a body `C` marks a turn end.

use super::*;
use std::fs::{self, File, OpenOptions};
use std::path::Path;

/// A toy layout: file header `TOY1`, records `TREC | len u32 | crc u32 | body`.
struct Toy(Turns);

const MARK: [u8; 4] = *b"TREC";

impl Framing for Toy {
    type Header = (u32, u32);
    const HEADER_LEN: usize = 12;
    fn data_start(&self) -> u64 {
        4
    }
    fn marker(&self) -> [u8; 4] {
        MARK
    }
    fn decode(&self, b: &[u8]) -> Option<(u32, u32)> {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (b[..4] == MARK && w(4) < 1 << 20).then(|| (w(4), w(8)))
    }
    fn meta_len(&self, _h: &(u32, u32)) -> u64 {
        0
    }
    fn body_len(&self, h: &(u32, u32)) -> u64 {
        h.0.into()
    }
    fn meta_ok(&self, _h: &(u32, u32), _meta: &[u8]) -> bool {
        true
    }
    fn body_ok(&self, h: &(u32, u32), body: &[u8]) -> bool {
        crc32fast::hash(body) == h.1
    }
    fn ends_turn(&self, h: &(u32, u32)) -> bool {
        h.1 == crc32fast::hash(b"C")
    }
    fn turns(&self) -> Turns {
        self.0
    }
    fn filler(&self, len: u64) -> Option<Vec<u8>> {
        let n = u32::try_from(len.checked_sub(12)?).ok()?;
        let crc = crc32fast::hash(&vec![0u8; n as usize]);
        Some(rec_header(n, crc))
    }
}

fn rec_header(n: u32, crc: u32) -> Vec<u8> {
    [&MARK[..], &n.to_le_bytes(), &crc.to_le_bytes()].concat()
}

fn rec(body: &str) -> Vec<u8> {
    rec_of(body.as_bytes())
}

fn rec_of(b: &[u8]) -> Vec<u8> {
    [rec_header(b.len() as u32, crc32fast::hash(b)), b.to_vec()].concat()
}

/// Writes `TOY1` and `parts` to a file; returns it and each part's offset.
fn file(dir: &Path, parts: &[Vec<u8>]) -> (File, Vec<u64>) {
    let path = dir.join("toy.log");
    let mut bytes = b"TOY1".to_vec();
    let mut offs = Vec::new();
    for p in parts {
        offs.push(bytes.len() as u64);
        bytes.extend_from_slice(p);
    }
    fs::write(&path, &bytes).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (f, offs)
}

fn damage(d: &Damaged) -> (u64, u64, bool) {
    (d.offset, d.len, d.torn)
}

const OPEN: Shape = Shape {
    sealed: false,
    end: None,
};

fn broken(body: &str) -> Vec<u8> {
    let mut r = rec(body);
    let n = r.len();
    r[n - 1] ^= 1;
    r
}

/// Each record its own turn (the change log): damage with a whole record after it is
/// corruption; damage with none after it is the torn tail.
#[test]
fn each_record_a_turn() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("toy.log");
    let (f, o) = file(
        dir.path(),
        &[rec("a"), broken("bb"), rec("c"), broken("dd")],
    );
    let s = scan(&Toy(Turns::EachRecord), &f, &p, OPEN).unwrap();
    let found: Vec<_> = s.damaged.iter().map(damage).collect();
    assert_eq!(found, vec![(o[1], 14, false), (o[3], 14, true)]);
    assert_eq!(s.records.len(), 2);
    assert_eq!(s.end(), o[3]);

    // Zeros after the last record (a file extended but not written): torn.
    let (f, o) = file(dir.path(), &[rec("a"), rec("b"), vec![0u8; 100]]);
    let s = scan(&Toy(Turns::EachRecord), &f, &p, OPEN).unwrap();
    assert_eq!(
        s.damaged.iter().map(damage).collect::<Vec<_>>(),
        vec![(o[2], 100, true)]
    );
}

/// Marked turns (spool segments): damage before a turn end that has a byte after it is
/// corruption; damage after the last such end is a torn tail, whole records in it included.
#[test]
fn marked_turns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("toy.log");
    let parts = [
        rec("a"),
        broken("bb"),
        rec("C"),
        rec("x"),
        broken("yy"),
        rec("z"),
    ];
    let (f, o) = file(dir.path(), &parts);
    let s = scan(&Toy(Turns::Marked), &f, &p, OPEN).unwrap();
    let found: Vec<_> = s.damaged.iter().map(damage).collect();
    let end = o[5] + 13;
    assert_eq!(found, vec![(o[1], 14, false), (o[4], end - o[4], true)]);
    // a, C and x are kept; z is inside the torn tail.
    assert_eq!(s.records.len(), 3);

    // The last turn end with nothing after it proves nothing, unless the file is sealed.
    let (f, o) = file(dir.path(), &[rec("a"), broken("bb"), rec("C")]);
    let s = scan(&Toy(Turns::Marked), &f, &p, OPEN).unwrap();
    assert_eq!(
        s.damaged.iter().map(damage).collect::<Vec<_>>(),
        vec![(o[1], 27, true)]
    );
    let sealed = Shape {
        sealed: true,
        end: None,
    };
    let s = scan(&Toy(Turns::Marked), &f, &p, sealed).unwrap();
    assert_eq!(
        s.damaged.iter().map(damage).collect::<Vec<_>>(),
        vec![(o[1], 14, false)]
    );
}

/// Unmarked turns (spool segments of format 1): nothing is proven, the first damage runs to
/// the end of the file; a void end hides what lies after it.
#[test]
fn unmarked_turns_and_void_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("toy.log");
    let (f, o) = file(dir.path(), &[rec("a"), broken("bb"), rec("C"), rec("d")]);
    let s = scan(&Toy(Turns::Unmarked), &f, &p, OPEN).unwrap();
    let len = f.metadata().unwrap().len();
    assert_eq!(
        s.damaged.iter().map(damage).collect::<Vec<_>>(),
        vec![(o[1], len - o[1], true)]
    );
    assert_eq!(s.records.len(), 1);
    let void = Shape {
        sealed: false,
        end: Some(o[1]),
    };
    let s = scan(&Toy(Turns::Unmarked), &f, &p, void).unwrap();
    assert!(s.damaged.is_empty());
    assert_eq!((s.records.len(), s.end()), (1, o[1]));
}

/// Corruption is kept aside whole, then filled with a stand-in, after which the file reads
/// whole; a torn tail is kept aside and cut. Copies never overwrite each other.
#[test]
fn keep_aside_fill_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("toy.log");
    let aside = dir.path().join("damaged");
    let (f, o) = file(
        dir.path(),
        &[rec("a"), broken("bb"), rec("c"), broken("dd")],
    );
    let toy = Toy(Turns::EachRecord);
    let s = scan(&toy, &f, &p, OPEN).unwrap();
    let none = |_: &Path| Ok(());
    for d in &s.damaged {
        let kept = keep_aside(&f, d, &aside, &none).unwrap();
        assert_eq!(
            fs::read(&kept).unwrap(),
            broken(if d.torn { "dd" } else { "bb" })
        );
        if d.torn {
            cut(&f, d.offset).unwrap();
        } else {
            assert!(fill(&toy, &f, d).unwrap());
        }
    }
    let s = scan(&toy, &f, &p, OPEN).unwrap();
    assert!(s.damaged.is_empty());
    assert_eq!(s.records.iter().map(|r| r.0).collect::<Vec<_>>(), o[..3]);
    let again = Damaged {
        path: p.clone(),
        offset: o[1],
        len: 3,
        torn: false,
        reason: String::new(),
        id: None,
        kept: None,
        left: false,
    };
    let second = keep_aside(&f, &again, &aside, &none).unwrap();
    assert!(
        second.display().to_string().ends_with(".corrupt.1"),
        "{second:?}"
    );
    let fail = |_: &Path| Err(std::io::Error::other("injected"));
    assert!(keep_aside(&f, &again, &aside, &fail).is_err());
    assert_eq!(
        fs::read_dir(&aside).unwrap().count(),
        3,
        "a failed copy leaves no file"
    );
}

/// A record copied into another record's body is not taken for one when the header before
/// it is intact; after a damaged header, the search finds the next whole record, even at an
/// overlapping marker.
#[test]
fn the_search_after_damage() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("toy.log");
    let mut hdr_damaged = rec("bb");
    hdr_damaged[0] ^= 1; // its marker: the header no longer decodes
    let parts = [
        rec_of(&rec("forged")),
        hdr_damaged,
        b"TTREC".to_vec(),
        rec("c"),
        rec("d"),
    ];
    let (f, o) = file(dir.path(), &parts);
    let s = scan(&Toy(Turns::EachRecord), &f, &p, OPEN).unwrap();
    let found: Vec<_> = s.damaged.iter().map(damage).collect();
    assert_eq!(found, vec![(o[1], o[3] - o[1], false)]);
    assert_eq!(
        s.records.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![o[0], o[3], o[4]]
    );
}
