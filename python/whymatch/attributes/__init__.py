"""SANE attribute explanations: an attribute model trained with saliency supervision, TCAV over the
similarity embedding, ranked attribute explanations, and attribute discovery (Plummer et al., ECCV 2020)."""
