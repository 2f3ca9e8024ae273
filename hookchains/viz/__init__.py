"""Pictures and pages: heatmaps, the sub-network graph (graphviz), the HTML reports."""
