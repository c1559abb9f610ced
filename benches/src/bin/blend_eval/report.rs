//! `blend.md`: the eval's JSON summary as Markdown tables.

pub(super) fn markdown(r: &serde_json::Value) -> String {
    let mut s = String::new();
    s.push_str("# Blend reuse vs exact (EmbeddingGemma-300M)\n\n");
    s.push_str(&format!(
        "{} · {} · `{}`\n\nPolicy: `{}`\n\n",
        r["date"].as_str().unwrap_or(""),
        r["commit"].as_str().unwrap_or(""),
        r["command"].as_str().unwrap_or(""),
        r["policy"]
    ));
    s.push_str("| workload | inputs | hits (escalated) | safe hits | hit speedup (median) | workload speedup | fidelity mean / p1 / min | recomputed share | lookup share of a hit |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let f = |v: &serde_json::Value, d: usize| {
        v.as_f64().map_or("–".to_string(), |x| format!("{x:.d$}"))
    };
    if let Some(w) = r["workloads"].as_object() {
        for (name, x) in w {
            s.push_str(&format!(
                "| {name} | {} | {} ({}) | {} | {}x | {}x | {} / {} / {} | {} | {} |\n",
                x["inputs"],
                x["hits"],
                x["escalated"],
                f(&x["safe_hit_rate"], 2),
                f(&x["hit_speedup_median"], 2),
                f(&x["workload_speedup"], 2),
                f(&x["fidelity_mean"], 4),
                f(&x["fidelity_p1"], 4),
                f(&x["fidelity_min"], 4),
                f(&x["recomputed_share_mean"], 3),
                f(&x["lookup_share_of_hit"], 3),
            ));
        }
    }
    if let Some(x) = r["workloads"]["spam-near-duplicates"].as_object() {
        s.push_str(&format!(
            "\nThe stored neighbour's exact embedding as it is (no forward at all) would have \
             fidelity {} / {} (mean / min) on the near duplicates: the baseline a hit has to beat.\n",
            f(&x["stored_as_is_fidelity_mean"], 4),
            f(&x["stored_as_is_fidelity_min"], 4),
        ));
    }
    s.push_str(&format!(
        "\nCalibration sweep ({} pairs; chosen: the fastest whose hits keep fidelity mean ≥ {} and min ≥ {}):\n\n",
        r["calibration_pairs"], r["targets"]["fidelity_mean"], r["targets"]["fidelity_min"]
    ));
    s.push_str("| max deviation | max pooled deviation | min share | max share | escalation (resume layer, share) | hit rate | fidelity mean / min | recomputed share | workload speedup |\n|---|---|---|---|---|---|---|---|---|\n");
    if let Some(sweep) = r["sweep"].as_array() {
        for p in sweep {
            let escalation = match p["policy"]["resume_layer"].as_u64() {
                Some(layer) => format!("{layer}, {}", f(&p["policy"]["escalate_share"], 2)),
                None => "–".to_string(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {escalation} | {} | {} / {} | {} | {}x |\n",
                f(&p["policy"]["max_deviation"], 3),
                p["policy"]["max_pooled_deviation"]
                    .as_f64()
                    .map_or("–".to_string(), |v| format!("{v:.1e}")),
                f(&p["policy"]["min_recompute_share"], 2),
                f(&p["policy"]["max_recompute_share"], 2),
                f(&p["hit_rate"], 2),
                f(&p["fidelity_mean"], 4),
                f(&p["fidelity_min"], 4),
                f(&p["recomputed_share_mean"], 3),
                f(&p["workload_speedup"], 2),
            ));
        }
    }
    if let Some(sweep) = r["dilution_sweep"].as_array().filter(|s| !s.is_empty()) {
        s.push_str(&format!(
            "\nDilution exponent (`--blend-dilution`) on {} calibration documents per length (512, 1024, 2048 tokens, one 16-token span edited), with the policy above otherwise:\n\n",
            r["long_calibration_documents"]
        ));
        s.push_str("| dilution | hit rate | fidelity mean / min | recomputed share | workload speedup |\n|---|---|---|---|---|\n");
        for p in sweep {
            s.push_str(&format!(
                "| {} | {} | {} / {} | {} | {}x |\n",
                f(&p["policy"]["dilution"], 1),
                f(&p["hit_rate"], 2),
                f(&p["fidelity_mean"], 4),
                f(&p["fidelity_min"], 4),
                f(&p["recomputed_share_mean"], 3),
                f(&p["workload_speedup"], 2),
            ));
        }
    }
    if let Some(rows) = r["lookup_overlap"].as_array().filter(|s| !s.is_empty()) {
        s.push_str(&format!(
            "\nLookup before layer 0 vs on a thread during it (`--blend-lookup-overlap-from`), each input a hit served {} times each way in alternating order, medians:\n\n",
            rows[0]["reps"]
        ));
        s.push_str("| input | tokens | before layer 0: request ms (lookup ms) | during layer 0: request ms (lookup ms) | speedup |\n|---|---|---|---|---|\n");
        for o in rows {
            s.push_str(&format!(
                "| {} | {} | {} ({}) | {} ({}) | {}x |\n",
                o["input"].as_str().unwrap_or("?"),
                o["tokens"],
                f(&o["before_ms"], 1),
                f(&o["lookup_before_ms"], 1),
                f(&o["during_ms"], 1),
                f(&o["lookup_during_ms"], 1),
                f(&o["speedup"], 3),
            ));
        }
    }
    s.push_str(&format!("\nHeadline: `{}`\n", r["headline"]));
    s
}
