"""HTTP: the MLflow REST API and UI (wire shapes only; SQL lives in query/), plus /health and /metrics."""
