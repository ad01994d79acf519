"""The DETR-style detection head shared by the BEVFormer student and the decoder teacher: deformable attention,
the query decoder with box refinement, Hungarian matching, the box coder and the head itself."""
