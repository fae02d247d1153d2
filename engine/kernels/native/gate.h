/* The gated MLP's activation for the native decoder block (gate.c). */
#ifndef BITSKIP_GATE_H
#define BITSKIP_GATE_H
#include <stdint.h>

/* a[i] = act(g[i]) * u[i] for i < count, act ReLU squared (relu2) or SiLU, in float64 rounded
 * once: libm's exp, to the bit. */
void bitskip_gate(const float *g, const float *u, int64_t count, int64_t relu2, float *a);

#endif
