"""Presentation: the only place that turns analyzer results into text tables, DataFrames and plotly figures."""
