"""ldm.samplers"""
