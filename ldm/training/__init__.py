"""ldm.training"""
