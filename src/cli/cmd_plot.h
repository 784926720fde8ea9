/*
 * cmd_plot: `patchsweep plot IN.nc -o OUT.svg`: the worksheet's heatmaps of
 * patching results and the logit-lens curves of lens files, as SVG.
 * Returns the process exit status.
 */
#ifndef PS_CMD_PLOT_H
#define PS_CMD_PLOT_H

int cmd_plot(int argc, char **argv);

#endif
