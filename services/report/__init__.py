"""`flywheel report`: KPIs per model version and decided experiments, as HTML + PNG."""
