"""Cryo-EM (TEM-style) physics: potential, projection, CTF, shifts, noise, RELION STAR + mrcs output.

Conventions are RELION 3.1's (``docs/architecture.md``): volumes indexed ``[z, y, x]`` (as
``mrcfile`` and ``torch-fourier-slice`` store them) with the origin at voxel ``N // 2``; an image
with Euler angles ``(rot, tilt, psi)`` is the projection along z of ``V(A^T r)``,
``A = xrai.rotations.relion_euler_to_matrix(rot, tilt, psi)``; the particle sits at the image
centre minus ``rlnOrigin``; protein is white; the CTF has RELION's sign (CTF(0) = +amplitude
contrast).
"""
