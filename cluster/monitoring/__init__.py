"""Monitoring that ships with the project: a Grafana dashboard of the RL metrics (`dashboard.py`
builds `grafana_rlhf_dashboard.json`) and the Prometheus scrape config Ray documents
(`prometheus.yml`). See the README's "Monitoring" section."""
