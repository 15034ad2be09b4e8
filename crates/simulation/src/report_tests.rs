use super::*;
use fedmicse_plot::testing::{assert_drawn, decode, has_colour};

fn record(round: u64, dev: Option<f64>) -> RoundRecord {
    RoundRecord {
        round,
        clients: 3,
        mean_loss: (round > 0).then_some(1.0 / round as f64),
        stsb_dev: dev,
        bytes_up: round << 21,
        bytes_down: round << 22,
        seconds: 1.5,
        ..Default::default()
    }
}

#[test]
fn rows_read_alike_from_records_and_the_wire() {
    assert_eq!(
        table_header(),
        "round clients  mean_loss  stsb_dev   bytes_up bytes_down  seconds"
    );
    let r = record(2, None);
    let row = Row::from(&r);
    assert_eq!(
        row.to_string(),
        "    2       3     0.5000         -       4.0M       8.0M      1.5"
    );
    let wire = pb::RoundSummary {
        round: 2,
        clients: 3,
        mean_loss: 0.5,
        dev_spearman: f64::NAN,
        bytes_up: 2 << 21,
        bytes_down: 2 << 22,
        seconds: 1.5,
    };
    assert_eq!(Row::from(&wire), row);
    let v = serde_json::to_value(Row::from(&record(0, Some(81.25)))).unwrap();
    assert_eq!(v["stsb_dev"], 81.25);
    assert_eq!(v["mean_loss"], serde_json::Value::Null);
    assert_eq!(human(999), "999");
    assert_eq!(human(1536), "1.5K");
    assert_eq!(human(3 << 30), "3.00G");
}

#[test]
fn rounds_json_names_the_setting_and_reads_back() {
    let mut r = record(1, Some(82.0));
    r.refused.insert("norm".into(), 2);
    r.bounded = 1;
    r.step_ratio = Some(0.01);
    let rounds = vec![record(0, Some(80.0)), r];
    let rules = UpdateRules::none();
    let hostile = vec!["agent-5".to_string()];
    let log = RunLog {
        clients: 5,
        byzantine: &hostile,
        attack: Some(Attack::SignFlip),
        defences: Defences::None,
        aggregation: Strategy::Median,
        updates: &rules,
        rounds: &rounds,
    };
    let v = serde_json::to_value(&log).unwrap();
    assert_eq!(v["clients"], 5);
    assert_eq!(v["byzantine"][0], "agent-5");
    assert_eq!(v["attack"], "sign-flip");
    assert_eq!(v["defences"], "none");
    assert_eq!(v["aggregation"], "median");
    assert_eq!(v["rounds"][0]["stsb_dev"], 80.0);
    // Every field of the records, refusals included.
    assert_eq!(v["rounds"][1]["refused"]["norm"], 2);
    assert_eq!(v["rounds"][1]["bounded"], 1);
    assert_eq!(v["rounds"][1]["step_ratio"], 0.01);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rounds.json");
    std::fs::write(&p, serde_json::to_string_pretty(&log).unwrap()).unwrap();
    assert_eq!(read_rounds(&p).unwrap(), rounds);
    // A coordinator's rounds.jsonl and the bare array of older versions.
    let jsonl: String = rounds
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&p, jsonl).unwrap();
    assert_eq!(read_rounds(&p).unwrap(), rounds);
    std::fs::write(&p, serde_json::to_string(&rounds).unwrap()).unwrap();
    assert_eq!(read_rounds(&p).unwrap(), rounds);
    std::fs::write(&p, "[]").unwrap();
    assert!(
        read_rounds(&p)
            .unwrap_err()
            .to_string()
            .contains("no rounds")
    );
}

#[test]
fn round_plots_are_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rounds.png");
    let history: Vec<RoundRecord> = (0..4).map(|r| record(r, Some(80.0 + r as f64))).collect();
    plot_rounds(&out, &history).unwrap();
    let (w, h, px) = decode(&out);
    // Three panels of 320 under a 60-pixel title.
    assert_eq!((w, h), (900, 60 + 3 * 320));
    assert_drawn(&px, w, h);
    assert!(has_colour(&px, 0) && has_colour(&px, 1));
}

#[test]
fn compare_draws_one_line_per_run() {
    let dir = tempfile::tempdir().unwrap();
    // A run as `simulate` writes it (an object) and one as a bare array.
    let a = dir.path().join("a.json");
    let recs: Vec<RoundRecord> = (0..4).map(|r| record(r, Some(80.0 + r as f64))).collect();
    let run = serde_json::json!({"attack": "scale", "rounds": recs});
    std::fs::write(&a, serde_json::to_string(&run).unwrap()).unwrap();
    let b = dir.path().join("b.json");
    let recs: Vec<RoundRecord> = (0..4)
        .map(|r| record(r, (r != 2).then(|| 80.0 - 20.0 * r as f64)))
        .collect();
    std::fs::write(&b, serde_json::to_string(&recs).unwrap()).unwrap();
    let runs = vec![
        ("default".to_string(), read_rounds(&a).unwrap()),
        ("none".to_string(), read_rounds(&b).unwrap()),
    ];
    assert_eq!(runs[0].1.len(), 4);
    assert_eq!(runs[1].1[2].stsb_dev, None);
    let out = dir.path().join("compare.png");
    plot_compare(&out, "scale attack", &runs).unwrap();
    let (w, h, px) = decode(&out);
    assert_eq!((w, h), (900, 380));
    assert_drawn(&px, w, h);
    let colours: std::collections::HashSet<[u8; 3]> = px.iter().copied().collect();
    assert!(colours.len() > 20, "{} colours", colours.len());
    let white = px.iter().filter(|p| **p == [255, 255, 255]).count();
    assert!(white < px.len() * 99 / 100, "nearly blank: {white} white");
    // Both line colours of the plot crate's palette are there.
    assert!(has_colour(&px, 0) && has_colour(&px, 1));
    assert!(plot_compare(&out, "none", &[]).is_err());
}
