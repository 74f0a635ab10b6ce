"""Experiments: an experiment file (TOML) planned into ordinary runs, trained and evaluated as
independent jobs, then compared (`hmst_bench.report`). `spec` reads the file, `plan` turns it into
runs and the steps each still needs, `execute` runs those steps (a local pool or submitit),
`job` is what one job process runs."""
