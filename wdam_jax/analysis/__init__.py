"""The paper's analyses of trained runs: Table 10 (WDAM sub-band weights), Fig. 2 (Haar sub-bands
of normal and synthetic anomalous images), Figs. 6 and 7 (heatmaps of several runs side by side)."""
